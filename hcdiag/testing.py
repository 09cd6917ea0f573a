"""Assertions for researchers' own CI: ``assert_barrier`` and the items of the pytest plugin.

>>> from hcdiag.testing import assert_barrier            # doctest: +SKIP
>>> assert_barrier("run.pt", require=["N1", "T4"])      # doctest: +SKIP
"""

from __future__ import annotations

import json

import pytest

from hcdiag.checks.barrier import parse_ids, run_checks


def _fmt_values(values: dict) -> str:
    from hcdiag.formats import to_jsonable

    scal = {k: v for k, v in to_jsonable(values).items() if isinstance(v, (int, float, str, bool)) or v is None}
    return json.dumps(scal)


def assert_barrier(run, *, require=None, tolerance: float = 0.05, device="cpu", allow_inconclusive: bool = False):
    """Run the checks in ``require`` (default all) on ``run`` (a path, dict or ``Run``) and raise
    ``AssertionError`` listing every check that fails (or is inconclusive, unless allowed), with its
    numbers. Returns the results when all hold."""
    ids = parse_ids(require, "require") if require is not None else None
    results = run_checks(run, select=ids, tolerance=tolerance, device=device)
    bad = [r for r in results if r.verdict == "fails" or (r.verdict == "inconclusive" and not allow_inconclusive)]
    if bad:
        lines = [f"{len(bad)} barrier check(s) did not hold (tau = {tolerance:g}):"]
        for r in bad:
            lines.append(f"  {r.id} {r.verdict}: {r.summary or r.reason} | {_fmt_values(r.values)}")
        raise AssertionError("\n".join(lines))
    return results


class BarrierItem(pytest.Item):
    """One check of one run file as a test item: pass (holds), fail (fails), skip (inconclusive)."""

    def __init__(self, *, result, run_path, **kw):
        super().__init__(**kw)
        self.result = result
        self.run_path = run_path

    def runtest(self):
        r = self.result
        if r.verdict == "inconclusive":
            pytest.skip(f"{r.id} inconclusive: {r.reason}")
        if r.verdict == "fails":
            raise AssertionError(f"{r.id} fails: {r.summary} | {_fmt_values(r.values)}")

    def reportinfo(self):
        return self.run_path, None, f"hcdiag {self.result.id}: {self.result.claim}"

    def repr_failure(self, excinfo, style=None):
        return str(excinfo.value)


class RunFileCollector(pytest.Collector):
    def __init__(self, *, run_path, tolerance, require, **kw):
        super().__init__(**kw)
        self.run_path, self.tolerance, self.require = run_path, tolerance, require

    def collect(self):
        ids = parse_ids(self.require, "--hcdiag-require") if self.require else None
        for r in run_checks(self.run_path, select=ids, tolerance=self.tolerance):
            yield BarrierItem.from_parent(self, name=r.id, result=r, run_path=self.run_path)


def collect_items(session, runs, *, tolerance=0.05, require=None) -> list:
    """The items of ``pytest --hcdiag-run RUN``: one per check per run file."""
    items = []
    for path in runs:
        col = RunFileCollector.from_parent(session, name=f"hcdiag[{path}]", run_path=path, tolerance=tolerance,
                                           require=require)
        items.extend(col.collect())
    return items
