"""The plan of a grid (hcdiag.plan): the work it counts is the work the trainer does."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hcdiag.plan import Counts, format_plan, grid_plan, job_counts, round_sizes
from hcdiag.train import Trainer, make_config

TINY = dict(enc_widths=(8,), dec_widths=(8,), latent_dim=2, batch_size=64, epochs=2, r0=8, k=3, em_backend="sklearn",
            epochs_per_round=2, steps_per_clustering=3, refine_cap=3, stage3_epochs=2, stage3_snapshots=1,
            eval_rows=100, references=())


def _data(seed, n=300, d=5):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 2.0, size=(3, d))
    return (means[rng.integers(0, 3, n)] + rng.normal(0, 0.3, size=(n, d))).astype(np.float32)


def test_round_sizes_follow_the_trainers_halving():
    assert round_sizes(16, 0.5) == [16, 8, 4] and round_sizes(2, 0.5) == [] and round_sizes(8, 0.5) == [8, 4]


@pytest.mark.parametrize("kw", [dict(method="vanilla"), dict(method="beta", kl_weight=2.0),
                                dict(method="hct", epoch_unit="data_pass"), dict(method="hct", epoch_unit="steps"),
                                dict(method="hct", epoch_unit="epochs"),
                                dict(method="hct", epoch_unit="steps", mode="simultaneous")])
def test_counted_steps_bound_the_steps_a_run_takes(seed, kw):
    x = _data(seed)
    cfg = make_config(None, seed=seed % 10_000, **{**TINY, **kw})
    run = Trainer(cfg, x, None).run()
    taken = int(run["history"]["step"][-1])  # references record no history rows
    c = job_counts(cfg, len(x))
    if kw["method"] == "hct":
        assert c.hct_lo <= taken <= c.hct_hi and c.vanilla_hi == 0
        spe = math.ceil(len(x) / cfg.batch_size)
        spc = {"data_pass": spe, "epochs": spe, "steps": cfg.steps_per_clustering}[cfg.epoch_unit]
        per = (lambda a: 1) if cfg.mode == "simultaneous" or cfg.epoch_unit == "data_pass" else (lambda a: a)
        s1 = sum(per(a) for a in round_sizes(cfg.r0, 0.5)) * cfg.epochs_per_round * spc
        refine = run["refinement"]["epochs"] * per(2) * spc  # naive: the refinement's epochs as the run recorded
        assert taken == s1 + refine + cfg.stage3_epochs * spc
    else:
        assert c.vanilla_lo == c.vanilla_hi == taken and c.hct_hi == 0
    assert c.evals_lo <= len(run["history"]["step"]) <= c.evals_hi


def test_references_are_counted_per_job_or_once_per_grid():
    cfg = make_config("smoke", method="hct", references=("collapsed", "vanilla", "control"))
    own, shared = job_counts(cfg, 1000), job_counts(cfg, 1000, shared_references=True)
    steps = cfg.epochs * math.ceil(1000 / cfg.batch_size)
    assert own.vanilla_hi - shared.vanilla_hi == 2 * steps and own.hct_hi == shared.hct_hi  # the control is not shared


def test_grid_plan_counts_shared_work_once():
    from hcdiag.verify import build_grid

    jobs = build_grid("smoke", ["synthetic"], 2, device="cpu")
    units = {"synthetic": {"vanilla": 1e-3, "hct": 2e-3, "eval": 1e-2, "mi": 0.0, "em": 1.0, "params": 10}}
    plan = grid_plan(jobs, {"synthetic": 4000}, units)
    assert plan["jobs"] == len(jobs) and sum(r["jobs"] for r in plan["rows"]) == len(jobs)
    assert plan["em_fits"] == 2 * make_config("smoke").r0  # one stage-0 fit per seed, shared by every job
    # collapsed: one per (convention, seed); vanilla reference: one per (multiple, convention, seed) of hct jobs
    cfgs = [make_config(j.preset, method=j.method, multiple=j.multiple, loss=j.loss, seed=j.seed, **dict(j.overrides))
            for j in jobs if j.group != "diffusion"]  # diffusion jobs have no VAE config (counted by their steps)
    want = {("c", c.loss, c.seed) for c in cfgs if "collapsed" in c.references}
    want |= {("v", c.multiple, c.loss, c.seed) for c in cfgs if c.method == "hct" and "vanilla" in c.references}
    assert plan["references"] == len(want)
    # section 7's jobs: Algorithm 2's step budget in denoiser steps, timed by the denoiser's unit when measured
    from hcdiag.diffusion.train import DiffusionConfig
    from hcdiag.verify import DIFFUSION

    budget = DiffusionConfig(**DIFFUSION["smoke"]["train"]).budget()
    dif = [r for r in plan["rows"] if r["group"].startswith("diffusion")]
    assert dif and all(r["counts"].diffusion == budget * r["jobs"] and r["counts"].vanilla_hi == 0 for r in dif)
    timed = grid_plan(jobs, {"synthetic": 4000}, {"synthetic": {**units["synthetic"], "diffusion": 1.0}})
    row = next(r for r in timed["rows"] if r["group"] == "diffusion (consensus)")
    assert math.isclose(row["hours"][0], budget * row["jobs"] / 3600)
    lo, hi = plan["hours"]
    assert 0 < lo <= hi and math.isclose(hi, sum(r["hours"][1] for r in plan["rows"]) + plan["em_hours"]
                                         + plan["reference_hours"])
    text = format_plan(plan, units, workers=2)
    assert f"{len(jobs)} jobs" in text and "with 2 worker(s)" in text


def test_counts_add_and_price():
    a, b = Counts(1, 2, 3, 4, 5, 6, 7, 8, 9), Counts(9, 8, 7, 6, 5, 4, 3, 2, 1)
    assert a + b == Counts(10, 10, 10, 10, 10, 10, 10, 10, 10)
    u = {"hct": 1.0, "vanilla": 10.0, "eval": 100.0, "mi": 1000.0, "em": 10000.0}
    assert a.seconds(u, False) == 1 + 30 + 500 + 7000 + 90000 and a.seconds(u, True) == 2 + 40 + 600 + 8000 + 90000


def test_reports_say_which_reading_of_the_epoch_a_run_used():
    from hcdiag.report import EPOCH_READINGS, markdown, run_description
    from hcdiag.runfile import Run, example_run

    run = example_run(seed=0)
    run["config"]["hct"]["epoch_unit"] = "data_pass"
    line = run_description(Run(run))
    assert "method `hct`" in line and f"HCT's epoch `data_pass`: {EPOCH_READINGS['data_pass']}" in line
    assert line in markdown([], run_path="r.pt", about=line)
    vanilla = Run(example_run(seed=0, method="vanilla"))
    assert "epoch" not in run_description(vanilla)
    del run["config"]["hct"]["epoch_unit"]
    assert "HCT's epoch not recorded" in run_description(Run(run))
