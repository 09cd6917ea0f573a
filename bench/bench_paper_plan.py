"""What the paper preset costs: step counts of one paper-preset run and of the whole paper grid, from unit
costs measured here, so that a GPU session can be planned before it starts.

Nothing long runs: per dataset (synthetic, and Fashion-MNIST when the Debian package
``dataset-fashion-mnist`` is installed) this measures, with the paper preset's real widths, latent
dimension, batch and evaluation rows, on ONE thread as ``hcdiag.verify.run_job`` trains:

* a vanilla step, an HCT cycle step (one clustering's term, ``mode='cycle'``), one history evaluation
  (``Trainer.evaluate`` on the eval rows, done after every cycle / epoch) and one mutual-information
  estimate (the aggressive baseline's stopping rule, every epoch while aggressive);
* EM (stage 0; every job of the grid needs it, baselines included, but verify's em-cache fits each distinct
  seed and EM setting once): R0 = 16, K = 8 on the full data set
  on synthetic; on Fashion-MNIST R0 = 2 (one batched call of the torch backend), extrapolated linearly.

The counts come from the real grid (:func:`hcdiag.verify.build_grid` ``'paper'``, one seed) and each job's
real config (:func:`hcdiag.train.make_config`), with the trainer's own halving rule. Refinement stops
when ``max(l_a, l_b) < eps``, which is not known in advance: the upper bound (``refine_cap`` cycles) is the
plan, the lower bound (eps reached at once) is printed beside it; so are the aggressive baseline's bounds
(aggressive mode for one epoch with the shortest inner loop, or for every epoch with the longest).

``BENCH_PAPER_CHECKS=1`` also trains a paper-shaped HCT run (paper architecture and eval rows, 5000
synthetic rows, one epoch per stage; about 1 minute) and times the barrier checks on it: ``run_job`` runs
them on the CPU with one thread whatever the training device (about 1.5 more minutes).

Seconds are this shared CPU's, noisy: read the counts and the orders of magnitude. A GPU divides the step
and EM times, not the counts.
"""

from __future__ import annotations

import math
import os
import tempfile
import time

import torch

from hcdiag.data import load
from hcdiag.errors import InputError
from hcdiag.plan import Counts, job_counts, unit_costs
from hcdiag.plan import round_sizes as _rounds
from hcdiag.train import PRESETS, Trainer, make_config
from hcdiag.verify import GRIDS, build_grid


def _seconds(c: Counts, u: dict, hi: bool) -> float:
    return c.seconds(u, hi)


def plan(ds: str, data, u: dict) -> None:
    n = len(data.x)
    jobs = build_grid("paper", [ds], 1, device="cpu")
    groups: dict[str, list] = {}
    em_keys: dict[tuple, int] = {}  # verify's em-cache: one stage-0 fit per distinct seed and EM setting
    for j in jobs:
        cfg = make_config(j.preset, method=j.method, multiple=j.multiple, loss=j.loss, seed=j.seed, device="cpu",
                          **dict(j.overrides))
        em_keys[(cfg.seed, cfg.r0, cfg.k, cfg.covariance, cfg.em_backend, cfg.em_init)] = cfg.r0
        key = {"main": f"main {j.label}", "phase": "phase (vanilla)", "ablation": "ablations (hct)"}[j.group]
        groups.setdefault(key, []).append(job_counts(cfg, n))
    hct_cfg = make_config("paper", method="hct", device="cpu")
    one = job_counts(hct_cfg, n)
    print(f"-- {ds}: {n} x {data.x.shape[1]}, paper preset (widths {list(hct_cfg.enc_widths)}, latent "
          f"{hct_cfg.latent_dim}, batch {hct_cfg.batch_size}, {u['params']:,} parameters), 1 thread")
    print(f"   unit costs: vanilla step {u['vanilla'] * 1e3:.1f} ms, HCT cycle step {u['hct'] * 1e3:.1f} ms "
          f"({u['hct'] / u['vanilla']:.2f}x), evaluation on {min(hct_cfg.eval_rows, n)} rows {u['eval'] * 1e3:.0f} ms, "
          f"MI {u['mi'] * 1e3:.0f} ms, EM {u['em']:.2f} s per run (R0 runs per job)")
    sizes = _rounds(hct_cfg.r0, hct_cfg.keep_ratio)
    print(f"   one paper HCT run (R0 {hct_cfg.r0}, rounds {sizes}, {math.ceil(n / hct_cfg.batch_size)} steps per "
          f"clustering per cycle): HCT steps {one.hct_lo:,}..{one.hct_hi:,} (incl. the control reference), vanilla "
          f"steps {one.vanilla_hi:,} (references), evaluations {one.evals_lo}..{one.evals_hi}, EM runs {one.em_runs}: "
          f"{_seconds(one, u, False) / 3600:.2f}..{_seconds(one, u, True) / 3600:.2f} h on this CPU")
    # HCT alone against a vanilla run of the same preset, without references or EM (the paper's 2-3x)
    bare_h = make_config("paper", method="hct", device="cpu", references=())
    bare_v = make_config("paper", method="vanilla", device="cpu", references=())
    h, v = job_counts(bare_h, n), job_counts(bare_v, n)
    v_s = v.seconds({**u, "em": 0.0}, True)
    print(f"   HCT / vanilla per run ({bare_h.epoch_unit} reading, no references, no EM; estimated from the step "
          f"costs above): {h.seconds({**u, 'em': 0.0}, False) / v_s:.2f}..{h.seconds({**u, 'em': 0.0}, True) / v_s:.2f}x "
          "(the paper: 2-3x, section 6.2; goal <= 2.5x)")
    total = None
    print(f"   {'group':<24}{'jobs':>5}{'HCT steps':>22}{'vanilla steps':>22}{'EM runs':>9}{'hours (lo..hi)':>18}")
    for key, cs in groups.items():
        s = cs[0]
        for c in cs[1:]:
            s = s + c
        total = s if total is None else total + s
        print(f"   {key:<24}{len(cs):>5}{f'{s.hct_lo:,}..{s.hct_hi:,}':>22}{f'{s.vanilla_lo:,}..{s.vanilla_hi:,}':>22}"
              f"{s.em_runs:>9}{f'{_seconds(s, u, False) / 3600:.1f}..{_seconds(s, u, True) / 3600:.1f}':>18}")
    shared = sum(em_keys.values())
    saved = (total.em_runs - shared) * u["em"]  # the fits the em-cache does not repeat
    em_h = shared * u["em"] / 3600
    seed = None
    for key, cs in groups.items():
        if not key.startswith("ablations"):  # ablations run one seed; main and phase runs once per seed
            for c in cs:
                seed = c if seed is None else seed + c
    seed_saved = (seed.em_runs - hct_cfg.r0) * u["em"]  # a further seed's main and phase jobs share one fit
    print(f"   whole paper grid on {ds}, 1 seed, {len(jobs)} runs: {(_seconds(total, u, False) - saved) / 3600:.1f}.."
          f"{(_seconds(total, u, True) - saved) / 3600:.1f} h on this CPU (one thread, serial), of which EM "
          f"{em_h:.1f} h ({shared} EM runs, one fit per distinct setting through verify's em-cache; the group rows "
          f"count {total.em_runs}, as if each job fitted its own); each further seed adds "
          f"{(_seconds(seed, u, False) - seed_saved) / 3600:.1f}..{(_seconds(seed, u, True) - seed_saved) / 3600:.1f} h")


def checks_cost() -> None:
    """Train a paper-shaped HCT run (architecture, eval rows and snapshots of the paper preset, little
    training) and time the barrier checks as run_job runs them (CPU, one thread)."""
    from hcdiag.checks.barrier import run_checks

    data = load("synthetic", n_samples=5000)
    cfg = make_config("paper", method="hct", device="cpu", epochs_per_round=1, refine_cap=1, stage3_epochs=6,
                      epochs=1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "run.pt")
        t = time.perf_counter()
        Trainer(cfg, data, path).run()
        train_s = time.perf_counter() - t
        size = os.path.getsize(path) / 1e6
        t = time.perf_counter()
        res = run_checks(path)
        all_s = time.perf_counter() - t
    slow = sorted(res, key=lambda r: -r.values.get("seconds", 0))[:4]
    kl = sum(r.values.get("seconds", 0) for r in res if r.id in ("KL", "AU"))
    print(f"-- barrier checks on a paper-shaped HCT run ({cfg.eval_rows} eval rows, N = 32; trained in {train_s:.0f} s, "
          f"run file {size:.0f} MB): all checks {all_s:.0f} s (main HCT jobs), KL+AU {kl:.0f} s (every other job); "
          "slowest: " + ", ".join(f"{r.id} {r.values['seconds']:.0f} s" for r in slow))


def main():
    torch.set_num_threads(1)  # as run_job trains
    assert GRIDS["paper"]["ablations"] and PRESETS["paper"]["epoch_unit"] == "data_pass"
    syn = load("synthetic")
    plan("synthetic", syn, unit_costs(syn, "paper", em_r0=PRESETS["paper"]["r0"]))
    try:
        fm = load("fashion-mnist")
    except InputError as exc:  # the Debian package is optional
        print(f"-- fashion-mnist: skipped ({exc})")
    else:
        plan("fashion-mnist", fm, unit_costs(fm, "paper", em_r0=2))
    if os.environ.get("BENCH_PAPER_CHECKS") == "1":
        checks_cost()
    else:
        print("-- barrier checks: set BENCH_PAPER_CHECKS=1 to time them on a paper-shaped run (~3 min)")


if __name__ == "__main__":
    main()
