"""The registry of barrier checks and the function that runs them on a run file.

Kernels (pure functions on tensors) live in ``delta``, ``witness`` and ``hcdiag.metrics``; each claim
group has one module (``regions``: Lemma 4.3, ``exclusion``: Theorem 4.4, ``inertia``: Corollary 4.5,
``collapse``: the collapse metrics). This module only reads the run file (never the trainer).
"""

from __future__ import annotations

import time
from typing import Callable

from hcdiag.checks import collapse, exclusion, inertia, regions, teacher
from hcdiag.checks.base import CheckResult, RunContext
from hcdiag.checks.evidence import verify
from hcdiag.errors import InputError

CHECKS: dict[str, Callable[[RunContext], CheckResult]] = {
    "N1": regions.check_n1,
    "N2": regions.check_n2,
    "N3": regions.check_n3,
    "T1": exclusion.check_t1,
    "T2": exclusion.check_t2,
    "T2b": exclusion.check_t2b,
    "T3": exclusion.check_t3,
    "T4": exclusion.check_t4,
    "I1": inertia.check_i1,
    "I2": inertia.check_i2,
    "I3": inertia.check_i3,
    "KL": collapse.check_kl,
    "AU": collapse.check_au,
}
# Checks of the other systems under test, run by default only on their own runs (a teacher-guided VAE run has a
# 'teacher' record); any run may select them by id.
METHOD_CHECKS: dict[str, Callable[[RunContext], CheckResult]] = {
    "W3": teacher.check_w3,
    "W4": teacher.check_w4,
}
ALL_CHECKS = {**CHECKS, **METHOD_CHECKS}


def default_ids(run) -> list[str]:
    """The checks run when none are selected: the barrier checks, and a method's own on its runs."""
    return list(CHECKS) + (["W3", "W4"] if getattr(run, "teacher", None) is not None else [])


def parse_ids(text: str | list[str] | None, what: str = "select") -> list[str]:
    """Check ids from a comma list (case-insensitive); refuses unknown ids naming the valid ones. ``what`` is
    where the ids came from, as the message names it: a parameter, or the caller's command-line option."""
    if text is None:
        return list(CHECKS)
    items = text.split(",") if isinstance(text, str) else list(text)
    by_lower = {k.lower(): k for k in ALL_CHECKS}
    out, bad = [], []
    for it in (i.strip() for i in items):
        if not it:
            continue
        (out if it.lower() in by_lower else bad).append(by_lower.get(it.lower(), it))
    if bad:
        raise InputError(f"{what}: unknown check id(s) {', '.join(bad)}; valid ids are {', '.join(ALL_CHECKS)}.")
    if not out:
        raise InputError(f"{what} names no check; valid ids are {', '.join(ALL_CHECKS)}.")
    return out


def run_checks(run, *, select=None, tolerance: float = 0.05, device="cpu", seed: int = 0,
               progress: Callable[[str], None] | None = None) -> list[CheckResult]:
    """Run the selected checks (default all, in registry order) on a run (a path, a dict or a ``Run``)."""
    from hcdiag.runfile import Run, load_run

    if not (tolerance >= 0 and tolerance < 10):
        raise InputError(f"The 'tolerance' parameter must be a float in [0, 10). Got {tolerance}.")
    if isinstance(run, dict):
        from hcdiag.runfile import validate_run

        validate_run(run)
        run = Run(run)
    elif not isinstance(run, Run):
        run = load_run(run)
    if select is None:
        ids = default_ids(run)
    else:
        ids = parse_ids(select) if not (isinstance(select, list) and all(s in ALL_CHECKS for s in select)) else select
    ctx = RunContext(run, tolerance=tolerance, device=device, seed=seed)
    verify(ctx)  # stored numbers the run's own models contradict are refused; the checks use recomputed ones
    ctx.take_defaults()
    results = []
    for cid in ids:
        t0 = time.perf_counter()
        if progress:
            progress(f"check {cid} ...")
        res = ALL_CHECKS[cid](ctx)
        res.values.setdefault("seconds", time.perf_counter() - t0)
        res.values["defaults"] = ctx.take_defaults()  # the absent fields this check read as defaults
        if res.tolerance is None and res.verdict != "inconclusive":
            res.tolerance = tolerance
        results.append(res)
    return results
