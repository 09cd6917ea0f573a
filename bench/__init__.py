"""Benchmarks: ``make bench`` runs every ``bench/bench_*.py`` module's ``main()``.

Each benchmark prints ratios against a baseline measured in the same run (never absolute
seconds as a pass/fail). Select some with ``python -m bench spectrum train``.
"""
