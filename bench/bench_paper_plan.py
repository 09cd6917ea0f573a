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
from dataclasses import dataclass

import numpy as np
import torch

from hcdiag.data import load
from hcdiag.errors import InputError
from hcdiag.train import PRESETS, Trainer, make_config
from hcdiag.train.methods.hct import n_keep
from hcdiag.verify import GRIDS, build_grid


@dataclass(frozen=True)
class Counts:
    """Work of one job: optimizer steps by kind (lower and upper bound), history evaluations, MI estimates,
    EM runs (stage 0)."""

    hct_lo: int
    hct_hi: int
    vanilla_lo: int
    vanilla_hi: int
    evals_lo: int
    evals_hi: int
    mi_lo: int
    mi_hi: int
    em_runs: int

    def __add__(self, o: "Counts") -> "Counts":
        return Counts(*(a + b for a, b in zip(self.__dict__.values(), o.__dict__.values())))


def _rounds(r0: int, keep_ratio: float) -> list[int]:
    """Active-set sizes of the stage-1 rounds (the trainer's ``n_keep``), e.g. 16 -> [16, 8, 4]."""
    sizes, a = [], r0
    while a > 2:
        sizes.append(a)
        a = n_keep(a, keep_ratio)
    return sizes


def job_counts(cfg, n: int) -> Counts:
    """The steps a run of ``cfg`` on ``n`` rows takes (claims.md, Training pipeline; hcdiag.train)."""
    spe = math.ceil(n / cfg.batch_size)  # steps per data epoch
    if cfg.method != "hct":
        e = cfg.epochs
        van = e * spe
        if cfg.method == "aggressive":
            # He et al. 2019: while aggressive (at least the first epoch, at most all), an encoder inner loop
            # before each decoder step, of at least two check blocks and at most aggressive_max_inner steps
            inner_lo = min(2 * cfg.aggressive_check_every, cfg.aggressive_max_inner)
            lo, hi = van + inner_lo * spe * min(1, e), van * (1 + cfg.aggressive_max_inner)
            return Counts(0, 0, lo, hi, e + 1, e + 1, min(1, e), e, cfg.r0)
        return Counts(0, 0, van, van, e + 1, e + 1, 0, 0, cfg.r0)
    spc = spe if cfg.epoch_unit in ("epochs", "data_pass") else cfg.steps_per_clustering
    # steps per clustering-slot of a cycle; data_pass: one data pass per cycle whatever the active set's size
    per = (lambda a: a) if cfg.mode == "cycle" and cfg.epoch_unit != "data_pass" else (lambda a: 1)
    sizes = _rounds(cfg.r0, cfg.keep_ratio)
    s1 = sum(per(a) for a in sizes) * cfg.epochs_per_round * spc
    s2_hi = cfg.refine_cap * per(2) * spc
    s3 = cfg.stage3_epochs * spc
    # init, each stage-1 cycle, refinement's first look at the pair, each stage-3 cycle, the final model
    ev_lo = 1 + len(sizes) * cfg.epochs_per_round + 1 + cfg.stage3_epochs + 1
    ev_hi = ev_lo + cfg.refine_cap
    hct_lo, hct_hi, van = s1 + s3, s1 + s2_hi + s3, 0
    for ref in cfg.references:
        if ref in ("collapsed", "vanilla"):
            van += cfg.epochs * spe
        else:  # the no-history control: the steps of stages 1 and 2, on the final pair
            hct_lo, hct_hi = hct_lo + s1, hct_hi + s1 + s2_hi
        ev_lo, ev_hi = ev_lo + 1, ev_hi + 1
    return Counts(hct_lo, hct_hi, van, van, ev_lo, ev_hi, 0, 0, cfg.r0)


def _median_block(fns: dict, reps: int, blocks: int) -> dict:
    """Seconds per call of each function: interleaved blocks, the median block (load drifts hit all alike)."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(blocks):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times[k].append((time.perf_counter() - t) / reps)
    return {k: float(np.median(v)) for k, v in times.items()}


def unit_costs(data, em_r0: int) -> dict:
    """Seconds per vanilla step, HCT cycle step, history evaluation, MI estimate and EM run (paper preset)."""
    from hcdiag.clusterings import fit_clusterings
    from hcdiag.metrics import mutual_information
    from hcdiag.models import encode_decode

    cfg = make_config("paper", method="hct", device="cpu")
    tr = Trainer(cfg, data, None)
    tr.setup()
    t = time.perf_counter()
    cs = fit_clusterings(tr.x_np, em_r0, cfg.k, covariance=cfg.covariance, backend=cfg.em_backend, init=cfg.em_init,
                         seed=cfg.seed, device=tr.device, uneven=True)
    em = (time.perf_counter() - t) / em_r0
    tr.loop.set_centroids(torch.as_tensor(cs.centroids, dtype=torch.float32))
    model = tr.new_model()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = tr.loop.new_state(cfg.seed)
    one = torch.tensor([0])

    def mi():
        mu, lv, _ = encode_decode(model, tr.eval_x)
        return mutual_information(mu, lv, seed=0)

    out = _median_block({"vanilla": lambda: tr.loop.step(model, opt, state, None, 0.0, 1.0),
                         "hct": lambda: tr.loop.step(model, opt, state, one, cfg.beta_start, 1.0),
                         "eval": lambda: tr.loop.evaluate(model), "mi": mi}, reps=3, blocks=3)
    out["em"] = em
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def _seconds(c: Counts, u: dict, hi: bool) -> float:
    pick = (lambda lo, h: h) if hi else (lambda lo, h: lo)
    return (pick(c.hct_lo, c.hct_hi) * u["hct"] + pick(c.vanilla_lo, c.vanilla_hi) * u["vanilla"]
            + pick(c.evals_lo, c.evals_hi) * u["eval"] + pick(c.mi_lo, c.mi_hi) * u["mi"] + c.em_runs * u["em"])


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
    plan("synthetic", syn, unit_costs(syn, em_r0=PRESETS["paper"]["r0"]))
    try:
        fm = load("fashion-mnist")
    except InputError as exc:  # the Debian package is optional
        print(f"-- fashion-mnist: skipped ({exc})")
    else:
        plan("fashion-mnist", fm, unit_costs(fm, em_r0=2))
    if os.environ.get("BENCH_PAPER_CHECKS") == "1":
        checks_cost()
    else:
        print("-- barrier checks: set BENCH_PAPER_CHECKS=1 to time them on a paper-shaped run (~3 min)")


if __name__ == "__main__":
    main()
