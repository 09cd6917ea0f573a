"""Historical Consensus Training (paper section 4.2, Algorithm 1; claims.md, Training pipeline).

0. EM ``R0`` times with different seeds (the trainer, :mod:`hcdiag.clusterings`).
1. Rounds: train on the active set ``S_t`` for ``epochs_per_round`` cycles, then evaluate ``l_C`` of EVERY
   clustering (active and discarded) and keep the best ``keep_ratio`` of ``S_t`` (:func:`keep_best`) until
   two remain.
2. Refinement on the last pair until ``max(l_a, l_b) < eps`` or ``refine_cap`` cycles (recorded).
3. Stress test on one clustering for ``stage3_epochs`` cycles, with snapshots along the way.

The clustering weight beta follows ``beta_schedule`` over stage 1 and stays at its end value after it.
Each stage is a function of the trainer's services that adds its record to the run (``rounds``,
``refinement``, ``stage3``) and saves, so ``--resume`` continues after any of them.
"""

from __future__ import annotations

import time

import torch

from hcdiag.losses import Schedule
from hcdiag.records import Refinement, Round, Stage3
from hcdiag.train.methods.base import Method
from hcdiag.train.writer import snapshot_marks


def n_keep(n_active: int, ratio: float) -> int:
    """How many of ``n_active`` clusterings a round keeps: ``ratio`` of them, at least 2, strictly fewer."""
    return max(2, min(n_active - 1, int(round(n_active * ratio))))


def n_rounds(r0: int, ratio: float) -> int:
    """Stage-1 rounds from ``r0`` clusterings down to the final pair."""
    n, t = r0, 0
    while n > 2:
        n = n_keep(n, ratio)
        t += 1
    return t


def keep_best(losses, active: list[int], ratio: float) -> tuple[list[int], float]:
    """Section 4.2.1 step 3: the ``n_keep`` active clusterings with the smallest ``l_C`` (ties broken by id),
    sorted by id, and ``eps_t``, the largest ``l_C`` among them (Def. 4.2). ``losses`` (R0,) holds every
    clustering's loss; only the active ones compete."""
    order = sorted(active, key=lambda i: (float(losses[i]), i))
    kept = sorted(order[:n_keep(len(active), ratio)])
    return kept, max(float(losses[i]) for i in kept)


class HCT(Method):
    """Historical Consensus Training (module docstring)."""

    name = "hct"
    pipeline = True

    def train(self, t, run: dict) -> None:
        c = t.cfg
        model = t.initial_model()
        opt = torch.optim.Adam(model.parameters(), lr=c.lr)
        beta = Schedule(c.beta_schedule, c.beta_start, c.beta_end)
        pos = t.writer.resume_position()
        if pos is not None:
            state = t.writer.restore(model, opt, c.seed)
        else:
            state = t.loop.new_state(c.seed)
            t.writer.snapshot(model, "init")
            t.writer.record(model, "stage1", state, None)
            pos = {"stage": "stage1", "round": 0}
        for stage in (stage1, stage2, stage3):
            t0 = time.perf_counter()
            pos = stage(t, run, model, opt, state, beta, pos)
            t.timings[stage.__name__] = t.timings.get(stage.__name__, 0.0) + time.perf_counter() - t0


def stage1(t, run: dict, model, opt, state: dict, beta: Schedule, pos: dict) -> dict:
    """The rounds: ``epochs_per_round`` cycles on the active set, then :func:`keep_best`; one record per
    round in ``run['rounds']`` (active, kept, every l_C, eps_t, snapshot, beta) and a save after each."""
    c = t.cfg
    R0 = t.loop.centroids.shape[0]
    cycles = max(1, n_rounds(R0, c.keep_ratio) * c.epochs_per_round)
    rounds = t.writer.rounds()
    active = list(range(R0)) if not rounds else list(rounds[-1].kept)
    r = len(rounds)
    while pos["stage"] == "stage1":
        if len(active) <= 2:
            return {"stage": "stage2"}
        for e in range(c.epochs_per_round):
            terms = t.loop.cycle(model, opt, state, active, beta.value(state["epoch"] / cycles),
                                 f"stage 1, round {r}, epoch {e + 1}")
            state["epoch"] += 1
            ev = t.writer.record(model, "stage1", state, terms)
        losses = ev["losses"]  # (R0,) float64, l_C of every clustering at Theta_t
        kept, eps_t = keep_best(losses, active, c.keep_ratio)
        t.writer.snapshot(model, f"round{r}")
        t.writer.add_round(Round(r, active, kept, losses.clone(), eps_t, f"round{r}",
                                 beta=float(beta.value(state["epoch"] / cycles)), where=f"rounds[{r}]"))
        t.progress.summary(f"round {r}: {len(active)} -> {len(kept)} clusterings kept {kept}, eps_t={eps_t:.4g}, "
                           f"KL={ev['kl']:.3f}, AU={ev['au']}, MSE={ev['mse']:.4g}")
        active, r = kept, r + 1
        pos = {"stage": "stage1" if len(active) > 2 else "stage2"}
        t.writer.save(model, opt, state, pos)
    return pos


def stage2(t, run: dict, model, opt, state: dict, beta: Schedule, pos: dict) -> dict:
    """Refinement on the final pair until ``max(l_a, l_b) < eps`` or ``refine_cap`` cycles; the record
    ``run['refinement']`` (pair, reached, eps, eps_T, epochs, the pair's losses per epoch, snapshot)."""
    if pos["stage"] != "stage2":
        return pos
    c = t.cfg
    b_end = beta.value(1.0)
    rounds = t.writer.rounds()
    pair = list(rounds[-1].kept) if rounds else list(range(t.loop.centroids.shape[0]))
    hist, reached = [], False
    ev = t.loop.evaluate(model)
    for e in range(c.refine_cap):
        la, lb = float(ev["losses"][pair[0]]), float(ev["losses"][pair[1]])
        if max(la, lb) < c.eps:
            reached = True
            break
        terms = t.loop.cycle(model, opt, state, pair, b_end, f"stage 2 (refinement), epoch {e + 1}")
        state["epoch"] += 1
        ev = t.writer.record(model, "stage2", state, terms)
        hist.append([float(ev["losses"][pair[0]]), float(ev["losses"][pair[1]])])
    la, lb = float(ev["losses"][pair[0]]), float(ev["losses"][pair[1]])
    reached = reached or max(la, lb) < c.eps
    t.writer.snapshot(model, "refined")
    t.writer.set_refinement(Refinement(pair, bool(reached), float(c.eps), max(la, lb), len(hist),
                                       torch.tensor(hist, dtype=torch.float64).reshape(-1, 2), "refined",
                                       beta=float(b_end), step=int(state["step"]), where="refinement"))
    t.progress.summary(f"refinement on {pair}: {len(hist)} epochs, eps_T={max(la, lb):.4g} "
                       f"({'reached' if reached else 'NOT reached'} eps={c.eps:g}), KL={ev['kl']:.3f}, AU={ev['au']}")
    pos = {"stage": "stage3"}
    t.writer.save(model, opt, state, pos)
    return pos


def stage3(t, run: dict, model, opt, state: dict, beta: Schedule, pos: dict) -> dict:
    """The stress test: ``stage3_epochs`` cycles on the pair's first clustering only, ``stage3_snapshots``
    snapshots along the way, then ``final``; the record ``run['stage3']``."""
    if pos["stage"] != "stage3":
        return pos
    c = t.cfg
    b_end = beta.value(1.0)
    a = t.writer.refinement().pair[0]
    marks = snapshot_marks(c.stage3_epochs, c.stage3_snapshots)
    names = []
    for e in range(c.stage3_epochs):
        terms = t.loop.cycle(model, opt, state, [a], b_end, f"stage 3 (single clustering {a}), epoch {e + 1}")
        state["epoch"] += 1
        t.writer.record(model, "stage3", state, terms)
        if e + 1 in marks:
            names.append(f"stage3_{len(names)}")
            t.writer.snapshot(model, names[-1])
    t.writer.snapshot(model, "final")
    ev = t.loop.evaluate(model)
    t.writer.set_stage3(Stage3(a, c.stage3_epochs, names, where="stage3"))
    t.progress.summary(f"stage 3 on clustering {a}: {c.stage3_epochs} epochs, KL={ev['kl']:.3f}, "
                       f"AU={ev['au']}, l_a={float(ev['losses'][a]):.4g}")
    pos = {"stage": "references", "done": []}
    t.writer.save(model, None, state, pos)
    return pos
