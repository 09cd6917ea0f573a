"""What a grid costs before it runs: the work of every job counted from its config, times unit costs
measured on this machine (``hcdiag verify --plan``; ``bench paper_plan`` prints the same for the paper grid).

Work per job (:func:`job_counts`): optimizer steps of HCT (stages 1-3, the no-history control) and of
vanilla-type training (baselines, the collapsed model, the vanilla reference) as lower and upper bounds
(refinement stops when ``max(l_a, l_b) < eps``, unknown in advance: from at once to ``refine_cap``
cycles; the aggressive baseline's inner loop from one epoch of the shortest to every epoch of the
longest), history evaluations, mutual-information estimates and EM runs. Unit costs (:func:`unit_costs`):
seconds per vanilla step, per HCT step, per evaluation, per MI estimate and per EM run, measured with the
preset's real architecture, batch and evaluation rows on one thread, as :func:`hcdiag.verify.run_job`
trains. A grid's plan (:func:`grid_plan`) counts what verify's caches share once: one stage-0 fit per
distinct EM setting (the em-cache) and one collapsed model and vanilla reference per distinct key (the
reference cache, :mod:`hcdiag.train.refcache`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

import numpy as np


@dataclass(frozen=True)
class Counts:
    """Work of one job: optimizer steps by kind (lower and upper bound), history evaluations, MI estimates,
    EM runs (stage 0)."""

    hct_lo: int = 0
    hct_hi: int = 0
    vanilla_lo: int = 0
    vanilla_hi: int = 0
    evals_lo: int = 0
    evals_hi: int = 0
    mi_lo: int = 0
    mi_hi: int = 0
    em_runs: int = 0
    diffusion: int = 0  # denoiser steps (section 7's runs), timed by their own unit

    def __add__(self, o: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(o, f.name) for f in fields(self)))

    def seconds(self, u: dict, hi: bool) -> float:
        """Serial seconds at the unit costs ``u`` (:func:`unit_costs`), lower (``hi=False``) or upper bound."""
        pick = (lambda lo, h: h) if hi else (lambda lo, h: lo)
        return (pick(self.hct_lo, self.hct_hi) * u["hct"] + pick(self.vanilla_lo, self.vanilla_hi) * u["vanilla"]
                + pick(self.evals_lo, self.evals_hi) * u["eval"] + pick(self.mi_lo, self.mi_hi) * u["mi"]
                + self.em_runs * u["em"] + self.diffusion * u.get("diffusion", u["vanilla"]))


def round_sizes(r0: int, keep_ratio: float) -> list[int]:
    """Active-set sizes of the stage-1 rounds (the trainer's halving rule), e.g. 16 -> [16, 8, 4]."""
    from hcdiag.train.methods.hct import n_keep

    sizes, a = [], r0
    while a > 2:
        sizes.append(a)
        a = n_keep(a, keep_ratio)
    return sizes


def reference_steps(cfg, n: int) -> int:
    """Optimizer steps of one collapsed model or vanilla reference (``epochs`` data epochs)."""
    return cfg.epochs * math.ceil(n / cfg.batch_size)


def job_counts(cfg, n: int, *, shared_references: bool = False) -> Counts:
    """The work a run of ``cfg`` on ``n`` rows does (claims.md, Training pipeline; :mod:`hcdiag.train`).
    ``shared_references``: leave the collapsed model and the vanilla reference out (a grid's plan counts
    each distinct one once)."""
    spe = math.ceil(n / cfg.batch_size)  # steps per data epoch
    refs = [r for r in cfg.references if cfg.method == "hct" or r == "collapsed"]
    shared_steps = 0 if shared_references else sum(reference_steps(cfg, n) for r in refs if r != "control")
    if cfg.method != "hct":
        e = cfg.epochs
        van = e * spe
        evals = e + 1 + len(refs)
        if cfg.method in ("aggressive", "em-type"):
            # an encoder inner loop before each decoder step: at least two check blocks (aggressive: only while
            # aggressive, at least the first epoch) and at most the cap, in every epoch
            cap = cfg.aggressive_max_inner if cfg.method == "aggressive" else cfg.em_max_e_steps
            every = cfg.aggressive_check_every if cfg.method == "aggressive" else cfg.em_check_every
            inner_lo = min(2 * every, cap)
            lo_epochs = min(1, e) if cfg.method == "aggressive" else e
            mi = (min(1, e), e) if cfg.method == "aggressive" else (0, 0)
            return Counts(0, 0, van + inner_lo * spe * lo_epochs + shared_steps, van * (1 + cap) + shared_steps,
                          evals, evals, mi[0], mi[1], cfg.r0)
        return Counts(0, 0, van + shared_steps, van + shared_steps, evals, evals, 0, 0, cfg.r0)
    data_pass = cfg.epoch_unit == "data_pass"
    spc = spe if cfg.epoch_unit in ("epochs", "data_pass") else cfg.steps_per_clustering
    # steps per clustering-slot of a cycle; data_pass: one data pass per cycle whatever the active set's size
    per = (lambda a: a) if cfg.mode == "cycle" and not data_pass else (lambda a: 1)
    sizes = round_sizes(cfg.r0, cfg.keep_ratio)
    s1 = sum(per(a) for a in sizes) * cfg.epochs_per_round * spc
    s2_hi = cfg.refine_cap * per(2) * spc
    s3 = cfg.stage3_epochs * spc
    # init, each stage-1 cycle, refinement's first look at the pair, each stage-3 cycle, the final model
    ev_lo = 1 + len(sizes) * cfg.epochs_per_round + 1 + cfg.stage3_epochs + 1 + len(refs)
    ev_hi = ev_lo + cfg.refine_cap
    hct_lo, hct_hi = s1 + s3, s1 + s2_hi + s3
    if "control" in refs:  # the no-history control: the steps of stages 1 and 2, on the final pair
        hct_lo, hct_hi = hct_lo + s1, hct_hi + s1 + s2_hi
    return Counts(hct_lo, hct_hi, shared_steps, shared_steps, ev_lo, ev_hi, 0, 0, cfg.r0)


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


def unit_costs(data, preset: str = "paper", *, em_r0: int = 2, device: str = "cpu", reps: int = 5,
               blocks: int = 3, **overrides) -> dict:
    """Seconds per vanilla step, HCT step, history evaluation, MI estimate and EM run (``em_r0`` runs timed,
    divided), with ``preset``'s architecture, batch and evaluation rows (and ``overrides``, e.g. a grid's) on
    ``data``, on one thread as :func:`hcdiag.verify.run_job` trains; also ``params``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _unit_costs(data, preset, em_r0=em_r0, device=device, reps=reps, blocks=blocks, **overrides)
    finally:
        torch.set_num_threads(threads)


def _unit_costs(data, preset: str, *, em_r0: int, device: str, reps: int, blocks: int, **overrides) -> dict:
    import torch

    from hcdiag.clusterings import fit_clusterings
    from hcdiag.metrics import mutual_information
    from hcdiag.models import encode_decode
    from hcdiag.train import Trainer, make_config

    cfg = make_config(preset, **{**overrides, "method": "hct", "device": device})
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
    one = torch.tensor([0], device=tr.device)

    def mi():
        mu, lv, _ = encode_decode(model, tr.eval_x)
        return mutual_information(mu, lv, seed=0)

    out = _median_block({"vanilla": lambda: tr.loop.step(model, opt, state, None, 0.0, 1.0),
                         "hct": lambda: tr.loop.step(model, opt, state, one, cfg.beta_start, 1.0),
                         "eval": lambda: tr.loop.evaluate(model), "mi": mi}, reps=reps, blocks=blocks)
    out["em"] = em
    out["params"] = sum(p.numel() for p in model.parameters())
    out["diffusion"] = _diffusion_step(tr.x_np.shape[1], reps=reps, blocks=blocks)
    return out


def _diffusion_step(d: int, *, reps: int, blocks: int, B: int = 256) -> float:
    """Seconds per step of Algorithm 2's denoiser (the verify grid's settings) on d-dimensional rows."""
    import torch

    from hcdiag.diffusion.model import Denoiser, Tables
    from hcdiag.diffusion.train import DiffusionConfig, _Draws, _loss

    cfg = DiffusionConfig().resolved(d)
    X = torch.randn(4 * B, d)
    tabs = [Tables(s) for s in cfg.schedules()]
    model = Denoiser(d, widths=tuple(cfg.widths), emb_dim=cfg.emb_dim, conditioning="schedule", n_schedules=cfg.R)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    draws = _Draws(0, X.shape[0], d, B, cfg.T)

    def step():
        rows, t, eps = draws.next()
        loss = _loss(model, X[rows], t, eps, tabs[0], 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _median_block({"d": step}, reps=reps, blocks=blocks)["d"]


def grid_plan(jobs, n_rows: dict, units: dict) -> dict:
    """The plan of ``jobs`` (:func:`hcdiag.verify.build_grid`): per group of jobs its count, work and serial
    hours, and the whole grid's, with the stage-0 fits and the references verify's caches share counted
    once. ``n_rows``: rows per dataset; ``units``: :func:`unit_costs` per dataset."""
    from hcdiag.train import make_config

    groups: dict[tuple[str, str], list] = {}
    em_keys: dict[tuple, int] = {}
    ref_keys: dict[tuple, int] = {}
    per_job: list[dict] = []
    for j in jobs:
        if j.group == "diffusion":  # optimizer steps of Algorithm 2 (each control the same), at the denoiser's cost
            from hcdiag.diffusion.train import DiffusionConfig
            from hcdiag.verify import DIFFUSION

            steps = DiffusionConfig(method=j.method, **DIFFUSION[j.preset]["train"]).budget()
            c = Counts(diffusion=steps)
            groups.setdefault((j.dataset, f"diffusion ({j.method})"), []).append(c)
            per_job.append({"name": j.name, "hours": (c.seconds(units[j.dataset], False) / 3600,
                                                      c.seconds(units[j.dataset], True) / 3600)})
            continue
        cfg = make_config(j.preset, method=j.method, multiple=j.multiple, loss=j.loss, seed=j.seed, device="cpu",
                          **dict(j.overrides))
        n = n_rows[j.dataset]
        em_keys[(j.dataset, cfg.seed, cfg.r0, cfg.k, cfg.covariance, cfg.em_backend, cfg.em_init)] = cfg.r0
        for r in cfg.references:
            if r == "collapsed" or (r == "vanilla" and cfg.method == "hct"):
                m = cfg.collapsed_multiple if r == "collapsed" else cfg.multiple
                key = (j.dataset, r, m, cfg.loss, cfg.seed, cfg.epochs, cfg.batch_size, cfg.lr, cfg.latent_dim,
                       cfg.enc_widths, cfg.dec_widths, cfg.arch)
                ref_keys[key] = reference_steps(cfg, n)
        label = {"main": f"main {j.method}{' ' + j.tag if j.tag else ''}", "phase": "phase (vanilla)",
                 "ablation": "ablations (hct)", "witness": f"witness (teacher {j.tag})"}[j.group]
        # a job relabelled from its twin's run (the same training under the other convention,
        # hcdiag.train.twin) trains nothing of its own
        c = Counts() if getattr(j, "twin", "") else Counts(**{**job_counts(cfg, n, shared_references=True).__dict__,
                                                               "em_runs": 0})
        groups.setdefault((j.dataset, label), []).append(c)
        per_job.append({"name": j.name, "hours": (c.seconds(units[j.dataset], False) / 3600,
                                                  c.seconds(units[j.dataset], True) / 3600),
                        "twin": getattr(j, "twin", "")})
    rows = []
    for (ds, label), cs in groups.items():
        s = sum(cs[1:], cs[0])
        rows.append({"dataset": ds, "group": label, "jobs": len(cs), "counts": s,
                     "hours": (s.seconds(units[ds], False) / 3600, s.seconds(units[ds], True) / 3600)})
    em_h = sum(r0 * units[k[0]]["em"] for k, r0 in em_keys.items()) / 3600
    ref_h = sum(steps * units[k[0]]["vanilla"] for k, steps in ref_keys.items()) / 3600
    lo = sum(r["hours"][0] for r in rows) + em_h + ref_h
    hi = sum(r["hours"][1] for r in rows) + em_h + ref_h
    return {"rows": rows, "em_fits": sum(em_keys.values()), "em_hours": em_h, "references": len(ref_keys),
            "reference_hours": ref_h, "hours": (lo, hi), "jobs": len(jobs), "per_job": per_job}


def duration(hours: float) -> str:
    """``hours`` in the unit that reads best: ``40 s``, ``12 min``, ``3.4 h``."""
    from hcdiag.formats import duration as text

    return text(hours * 3600)


def _span(lo: float, hi: float) -> str:
    return duration(lo) if duration(lo) == duration(hi) else f"{duration(lo)}..{duration(hi)}"


def format_plan(plan: dict, units: dict, workers: int) -> str:
    """The plan as the text ``hcdiag verify --plan`` prints."""
    lines = []
    for ds, u in units.items():
        lines.append(f"{ds}: unit costs on this machine (one thread, {u['params']:,} parameters): vanilla step "
                     f"{u['vanilla'] * 1e3:.1f} ms, HCT step {u['hct'] * 1e3:.1f} ms, evaluation {u['eval'] * 1e3:.0f} ms, "
                     f"MI {u['mi'] * 1e3:.0f} ms, EM {u['em']:.2f} s per run"
                     + (f", diffusion step {u['diffusion'] * 1e3:.1f} ms" if "diffusion" in u else ""))
    for j in plan.get("per_job", []):
        lines.append(f"  {j['name']:<64} " + (f"0 s (relabelled from {j['twin']}: the same training)" if j.get("twin")
                                             else _span(*j["hours"])))
    lines.append(f"{'dataset':<15}{'group':<24}{'jobs':>5}{'HCT steps':>24}{'vanilla steps':>24}{'time (lo..hi)':>20}")
    for r in plan["rows"]:
        c, (h_lo, h_hi) = r["counts"], r["hours"]
        steps = (f"{c.hct_lo:,}..{c.hct_hi:,}", f"{c.vanilla_lo:,}..{c.vanilla_hi:,}") if not c.diffusion else (
            "-", f"{c.diffusion:,} denoiser")
        lines.append(f"{r['dataset']:<15}{r['group']:<24}{r['jobs']:>5}{steps[0]:>24}{steps[1]:>24}"
                     f"{_span(h_lo, h_hi):>20}")
    lo, hi = plan["hours"]
    lines.append(f"shared once: {plan['em_fits']} EM runs ({duration(plan['em_hours'])}, the em-cache), "
                 f"{plan['references']} collapsed/vanilla references ({duration(plan['reference_hours'])}, the "
                 "reference cache)")
    lines.append(f"{plan['jobs']} jobs: {_span(lo, hi)} of training, serial, on this machine; with {workers} worker(s) "
                 f"about {_span(lo / workers, hi / workers)} (the barrier checks after each run come on top; a GPU "
                 "divides the step and EM times, not the counts)")
    return "\n".join(lines)


__all__ = ["Counts", "format_plan", "grid_plan", "job_counts", "reference_steps", "round_sizes", "unit_costs"]
