"""The VAE baselines (paper 5.1.2): vanilla (Kingma & Welling 2013), beta-VAE (Higgins et al. 2017; any KL
weight, < 1 allowed), KL annealing (KL weight ramped 0 -> 1 over ``anneal_epochs``; Bowman et al. 2015, Huang
et al. 2018) and free bits (Kingma et al. 2016, per dimension), and the epoch loop they share with the
aggressive baseline and the references.

Each baseline's objective is :func:`hcdiag.train.objectives.vae_terms` with its KL weight per epoch
(:meth:`Vanilla.kl_weight`) and its free bits (:meth:`Vanilla.free_bits`); no clustering term.
"""

from __future__ import annotations

import time

import torch

from hcdiag.errors import InputError, flag
from hcdiag.losses import LossWeights
from hcdiag.train.methods.base import Method
from hcdiag.train.writer import cpu_state, snapshot_marks


class Vanilla(Method):
    """The plain VAE: KL weight 1 in every epoch, one Adam over all parameters."""

    name = "vanilla"

    def kl_weight(self, cfg, epoch: int) -> float:
        """The KL weight of (0-based) ``epoch``."""
        return 1.0

    def free_bits(self, cfg) -> float:
        """Nats per latent dimension below which the KL term is not pushed down (0: none)."""
        return 0.0

    # -- the hooks of train_vae ---------------------------------------------------------------------------
    def begin(self, t, model, run: dict | None, weights: LossWeights) -> dict:
        return {"opt": torch.optim.Adam(model.parameters(), lr=t.cfg.lr), "weights": weights}

    def epoch_terms(self, t, model, ctx: dict, state: dict, epoch: int) -> list[torch.Tensor]:
        klw, fb = self.kl_weight(t.cfg, epoch), self.free_bits(t.cfg)
        return [t.loop.step(model, ctx["opt"], state, None, 0.0, klw, free_bits=fb, weights=ctx["weights"])
                for _ in range(t.loop.steps_per_epoch)]

    def after_epoch(self, t, model, ctx: dict, run: dict | None, epoch: int) -> None:
        pass

    def finish(self, t, ctx: dict, run: dict | None) -> None:
        pass

    def ctx_state(self, ctx: dict) -> dict:
        """What of ``ctx`` a checkpoint keeps for ``--resume`` to continue bitwise: every optimizer's state and
        the method's own plain values (:meth:`load_ctx` restores them)."""
        return {"opt": ctx["opt"].state_dict()}

    def load_ctx(self, ctx: dict, saved: dict) -> None:
        """Restore :meth:`ctx_state`'s ``saved`` into a fresh ``ctx`` (from :meth:`begin`)."""
        ctx["opt"].load_state_dict(saved["opt"])

    # -- the run ------------------------------------------------------------------------------------------
    def train(self, t, run: dict) -> None:
        """``epochs`` data epochs; snapshots ``init``, evenly spaced epochs and ``final``."""
        model = t.initial_model()
        pos = t.writer.resume_position()
        stage = (pos or {}).get("stage")
        if stage == "references":
            return
        if pos is not None and stage != "baseline":
            raise InputError(f"{flag('--resume', 'resume')}: {t.out} holds a checkpoint of stage {stage!r}, which the "
                             f"{self.name} method does not have (a damaged or edited file); train it again with "
                             f"{flag('--overwrite', 'overwrite=True')}.")
        state, _ = train_vae(t, self, model, t.cfg.epochs, run=run, stage="baseline", checkpoint=True)
        t.writer.save(model, None, state, {"stage": "references", "done": []})


class Beta(Vanilla):
    """beta-VAE: the KL weight ``kl_weight`` (e.g. 2 or 4, the paper's Table 1 rows) in every epoch."""

    name = "beta"

    def kl_weight(self, cfg, epoch: int) -> float:
        return cfg.kl_weight


class Anneal(Vanilla):
    """KL annealing: weight ``min(1, (epoch + 1) / anneal_epochs)``."""

    name = "anneal"

    def kl_weight(self, cfg, epoch: int) -> float:
        return min(1.0, (epoch + 1) / max(1, cfg.anneal_epochs))


class FreeBits(Vanilla):
    """Free bits: each dimension's batch-mean KL counts at least ``free_bits`` nats."""

    name = "freebits"

    def free_bits(self, cfg) -> float:
        return cfg.free_bits


class _Ctx:
    """A method's training context seen as one optimizer by :meth:`RunWriter.save`/``restore``: its state dict
    is :meth:`Vanilla.ctx_state` (every optimizer and the method's own values)."""

    def __init__(self, method: Vanilla, ctx: dict):
        self.method, self.ctx = method, ctx

    def state_dict(self) -> dict:
        return self.method.ctx_state(self.ctx)

    def load_state_dict(self, saved: dict) -> None:
        self.method.load_ctx(self.ctx, saved)


def train_vae(t, method: Vanilla, model, epochs: int, *, run: dict | None, stage: str,
              weights: LossWeights | None = None, seed_offset: int = 0, checkpoint: bool = False) -> tuple[dict, list]:
    """Train ``model`` with ``method``'s objective for ``epochs`` data epochs on its own stream (seeded
    ``seed + 1000 seed_offset``). With ``run``, one history row per epoch. Returns the stream state and the
    snapshots ``[(name, state_dict)]`` (init, ``baseline_snapshots`` evenly spaced epochs, final).

    With ``checkpoint`` (the run's main model; needs ``run``) the snapshots go to the run as they are taken (the
    returned list is empty) and the run file is saved after an epoch whenever ``t.checkpoint_seconds`` have
    passed since the last save, with what ``--resume`` needs to continue bitwise (model, the method's optimizers
    and values, the stream, the history rows); a resumed run starts after the last saved epoch."""
    c = t.cfg
    w = weights or t.loop.weights
    pos = t.writer.resume_position() if checkpoint else None
    resumed = pos is not None and pos.get("stage") == stage
    marks = snapshot_marks(epochs, c.baseline_snapshots)
    if resumed:
        start, snaps = pos.get("epoch"), []
        saved = t.writer.run["resume"]
        if not (isinstance(start, int) and not isinstance(start, bool) and 0 < start < epochs
                and saved.get("epoch") == start and saved.get("history_rows") == start + 1
                and isinstance(saved.get("optimizer"), dict)):
            raise InputError(f"{flag('--resume', 'resume')}: {t.out} holds a checkpoint that cannot be this run's "
                             f"(after epoch {start!r} of {epochs}, stream at epoch {saved.get('epoch')!r}, "
                             f"{saved.get('history_rows')!r} history rows, optimizer state "
                             f"{'saved' if isinstance(saved.get('optimizer'), dict) else 'missing'}): a damaged or "
                             f"edited file; train it again with {flag('--overwrite', 'overwrite=True')}.")
    else:
        start = 0
        state = t.loop.new_state(c.seed + 1000 * seed_offset)
        snaps = [("init", cpu_state(model.state_dict()))]
        if run is not None:
            t.writer.record(model, stage, state, None)
    ctx = method.begin(t, model, run, w)
    if resumed:
        try:
            state = t.writer.restore(model, _Ctx(method, ctx), c.seed + 1000 * seed_offset)
        except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
            raise InputError(f"{flag('--resume', 'resume')}: {t.out} holds a checkpoint whose training state cannot "
                             f"be restored ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'no detail'}); "
                             f"a damaged or edited file: train it again with {flag('--overwrite', 'overwrite=True')}.") from None
    if checkpoint:
        for name, sd in snaps:
            t.writer.add_state(name, sd)
        snaps = []
    every = float(getattr(t, "checkpoint_seconds", 60.0))
    last = tick = time.perf_counter()

    def clock() -> None:  # the training time so far, in the timings each save writes (a resume adds to them)
        nonlocal tick
        if checkpoint:
            now = time.perf_counter()
            t.timings[stage] = t.timings.get(stage, 0.0) + now - tick
            tick = now

    for e in range(start, epochs):
        terms = torch.stack(method.epoch_terms(t, model, ctx, state, e))
        t.loop.check_finite(terms, f"{stage} ({method.name}), epoch {e + 1}", state)
        state["step"] += len(terms)
        state["epoch"] += 1
        if run is not None:
            t.writer.record(model, stage, state, terms.mean(0))
        else:  # a reference: no history row, but its progress (a long one takes as long as the run)
            t.progress.update(f"{stage} ({method.name}) epoch {e + 1}/{epochs} loss {float(terms[:, 0].mean()):.4g}")
        method.after_epoch(t, model, ctx, run, e)
        if e + 1 in marks and e + 1 < epochs:
            if checkpoint:
                t.writer.snapshot(model, f"epoch{e + 1}")
            else:
                snaps.append((f"epoch{e + 1}", cpu_state(model.state_dict())))
        if checkpoint and e + 1 < epochs and time.perf_counter() - last >= every:
            clock()
            t.writer.save(model, _Ctx(method, ctx), state, {"stage": stage, "epoch": e + 1})
            last = time.perf_counter()
    method.finish(t, ctx, run)
    clock()
    if checkpoint:
        t.writer.snapshot(model, "final")
    else:
        snaps.append(("final", cpu_state(model.state_dict())))
    return state, snaps
