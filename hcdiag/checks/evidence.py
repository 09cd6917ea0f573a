"""Verify, don't trust: the numbers of a run file that hcdiag can recompute from the run's own models.

A run file stores numbers that decide verdicts (the round thresholds ``eps_t`` behind N1/N2, ``eps_T``
behind T1/T2, whether the refinement reached ``eps`` behind T2b) beside the models they came from, and
it may store a snapshot twice: as parameters (rebuilt through ``config.model``) and as ``outputs``. A
producer that measured on other rows, described its model wrongly (``gelu`` for a ReLU network) or
just wrote a wrong number would flip verdicts silently. So, once per run and before any check
(:func:`verify`, called by :func:`hcdiag.checks.barrier.run_checks`):

* where a snapshot has both parameters and outputs (the run's, and ``references.collapsed``), the
  rebuilt ``mu``, ``logvar`` and ``xhat = f(mu(x))`` on ``eval.x`` must match the stored ones:
  ``max |rebuilt - stored| <= 1e-3 * max(1, max |stored|)`` per key (:func:`output_tolerance`);
* ``rounds[t].losses`` (l_C of every clustering at the round's snapshot, eq. 8, float64),
  ``rounds[t].eps`` (their max over ``rounds[t].kept``, Def. 4.2), ``refinement.eps_T`` (``max(l_a, l_b)``
  at the refined snapshot) and ``refinement.reached`` (``eps_T < refinement.eps``) are recomputed on
  ``eval.x`` and must agree with the stored ones within :func:`loss_tolerance`.

A disagreement is an :class:`~hcdiag.errors.InputError` (one line naming the key, both numbers and the
tolerance; ``check-barrier`` exits 2). The checks then use the RECOMPUTED numbers
(:meth:`RunContext.regions`, :attr:`RunContext.refinement_reached`), never the stored ones.
:func:`recompute` is the pure part (no refusal), which :attr:`RunContext.evidence` uses when a check
runs on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hcdiag.errors import InputError, marked

__all__ = ["Evidence", "RefinementEvidence", "RoundEvidence", "data_scale", "loss_tolerance",
           "output_tolerance", "recompute", "verify"]

OUTPUT_RTOL = 1e-3
LOSS_RTOL = 1e-3  # relative: float32 evaluation on another device or with another batch size
LOSS_SQRT = 1e-4  # l_C moves by about 2 sqrt(l) |d xhat| when xhat moves by float32 rounding
LOSS_ABS = 1e-5  # a producer's float32 expansion ||x||^2 - 2 x.mu + ||mu||^2 on a model sitting on a centroid

_FIX = ("hcdiag recomputes this number from the run's own snapshot and refuses a file that contradicts it: compute "
        "it with eq. 8 on eval.x at that snapshot (docs/runfile.md, 'Numbers hcdiag recomputes').")


def output_tolerance(stored: torch.Tensor) -> float:
    """``1e-3 * max(1, max |stored|)``: how far a rebuilt output may be from the stored one."""
    return OUTPUT_RTOL * max(1.0, float(stored.abs().max()) if stored.numel() else 0.0)


def loss_tolerance(stored: float, recomputed: float, scale: float) -> float:
    """How far a stored clustering loss (or a max of them) may be from the recomputed one (squared data units).

    ``1e-3 max(|s|, |r|) + 1e-4 sqrt(max(s, r) S) + 1e-5 S`` with ``S = mean_x ||x||^2`` over eval.x
    (:func:`data_scale`). The first term covers float32 evaluation on another device; the second the
    float32 rounding of xhat, which moves l_C by about ``2 sqrt(l) |d xhat|``; the third the float32
    expansion ``||xhat||^2 - 2 xhat.mu + ||mu||^2`` that trainers use for eq. 8 (hcdiag's own did before
    it evaluated in float64; its older run files must still load):
    on a model that sits on a centroid (l ~ 0) each row's distance is a rounding error of a few
    ``2^-24 (||xhat||^2 + ||mu||^2)``, clamped at 0, so the stored mean is up to about ``1e-6 S`` where
    the float64 value is ~0 (measured over hundreds of draws at N = 784 and 3072; a third of them exceed
    ``1e-7 S``: tests/test_evidence.py). ``1e-5 S`` keeps a margin of 10 above that.
    """
    s, r = float(stored), float(recomputed)
    hi = max(s, r, 0.0)
    return LOSS_RTOL * max(abs(s), abs(r)) + LOSS_SQRT * math.sqrt(hi * scale) + LOSS_ABS * scale


def data_scale(x: torch.Tensor) -> float:
    """``S = mean_x ||x||^2`` over the evaluation rows ``x`` (m, N), float64."""
    return float((x.double() ** 2).sum(1).mean()) if x.numel() else 0.0


@dataclass(frozen=True)
class RoundEvidence:
    """Round ``round`` (entry ``index`` of ``rounds``) recomputed at its ``snapshot`` on eval.x: ``losses``
    (R0,) float64 (eq. 8) and ``eps = max over kept`` (Def. 4.2)."""

    index: int
    round: int
    snapshot: str
    kept: tuple[int, ...]
    losses: torch.Tensor
    eps: float


@dataclass(frozen=True)
class RefinementEvidence:
    """The refinement recomputed at its ``snapshot``: ``l_a``, ``l_b`` of the ``pair``, ``eps_T = max(l_a, l_b)``,
    the stored target ``eps`` and ``reached = eps_T < eps``."""

    snapshot: str
    pair: tuple[int, int]
    l_a: float
    l_b: float
    eps_T: float
    eps: float
    reached: bool


@dataclass(frozen=True)
class Evidence:
    """Every recomputed number of a run; ``scale`` is S = mean_x ||x||^2 (the tolerance's data scale)."""

    rounds: tuple[RoundEvidence, ...]
    refinement: RefinementEvidence | None
    scale: float

    def to_dict(self) -> dict:
        ref = self.refinement
        return {"rounds": [{"round": r.round, "snapshot": r.snapshot, "losses": r.losses.tolist(), "eps": r.eps}
                           for r in self.rounds],
                "refinement": None if ref is None else {"snapshot": ref.snapshot, "pair": list(ref.pair), "l_a": ref.l_a,
                                                        "l_b": ref.l_b, "eps_T": ref.eps_T, "reached": ref.reached},
                "scale": self.scale}


def _outputs_of(ctx, name: str, where: str):
    try:
        return ctx.outputs(name)
    except KeyError:
        raise InputError(f"{where} names snapshot {name!r}, whose parameters cannot be rebuilt (config.model is "
                         f"missing) and which has no outputs; add config.model or outputs.{name}.") from None


def recompute(ctx) -> Evidence:
    """Recompute every number hcdiag can: the losses and eps of each stage-1 round, eps_T and ``reached`` of
    the refinement, on eval.x at their snapshots (``ctx.losses``: eq. 8 in float64 on ``xhat = f(mu(x))``)."""
    run = ctx.run
    rounds = []
    for i, r in enumerate(run.rounds or []):
        _outputs_of(ctx, r.snapshot, f"rounds[{i}].snapshot")
        losses = ctx.losses(r.snapshot).double()  # (R0,)
        eps = float(losses[list(r.kept)].max()) if r.kept else float("nan")
        rounds.append(RoundEvidence(i, r.round, r.snapshot, r.kept, losses, eps))
    refinement = None
    ref = run.refinement
    if ref is not None:
        _outputs_of(ctx, ref.snapshot, "refinement.snapshot")
        losses = ctx.losses(ref.snapshot).double()
        a, b = ref.pair
        la, lb = float(losses[a]), float(losses[b])
        refinement = RefinementEvidence(ref.snapshot, (a, b), la, lb, max(la, lb), ref.eps, max(la, lb) < ref.eps)
    return Evidence(tuple(rounds), refinement, data_scale(run.eval_x))


def _model_words(cfg: dict | None) -> str:
    cfg = cfg or {}
    words = f"family {cfg.get('family')!r}"
    if cfg.get("family") in ("mlp", "conv"):
        act = cfg.get("activation")
        words += f", activation {act!r}" if act is not None else ", activation 'relu' (the default: absent)"
    return words


def _compare_outputs(rebuilt, stored, where: str, source: str, model_where: str, cfg: dict | None) -> None:
    for key, r, s in zip(("mu", "logvar", "xhat"), rebuilt, stored.astuple()):
        s = s.to(device=r.device, dtype=torch.float64)
        diff = (r.double() - s).abs()
        d = float(diff.max()) if diff.numel() else 0.0
        if not math.isfinite(d):
            d = math.inf  # a rebuilt output that overflows disagrees with any finite stored one
        tol = output_tolerance(s)
        if d > tol:
            raise InputError(f"{where}.{key} does not match {source} rebuilt with {model_where} ({_model_words(cfg)}): "
                             f"largest difference {d:.3g} > tolerance {tol:.3g} = 1e-3 * max(1, max|stored|); "
                             f"{model_where} must describe the model that made these outputs (family, widths, "
                             "activation), and outputs must be computed on eval.x with xhat = f(mu(x)) "
                             "(docs/runfile.md, 'Numbers hcdiag recomputes').")


def _check_loss(key: str, stored: float, recomputed: float, scale: float, source: str, what: str = "") -> None:
    tol = loss_tolerance(stored, recomputed, scale)
    if not math.isfinite(stored) or not abs(stored - recomputed) <= tol:
        raise InputError(f"{key} is {stored:.6g} but {source} gives {recomputed:.6g} on eval.x ({what}tolerance "
                         f"{tol:.3g}); {_FIX}")


def verify(ctx) -> Evidence:
    """Compare every stored number hcdiag can recompute with its recomputation; raise :class:`InputError` on
    the first disagreement beyond tolerance (prefixed with the run file's path when it has one). Returns the
    evidence (also kept on ``ctx``) the checks use."""
    try:
        ev = _verify(ctx)
    except InputError as exc:
        if ctx.run.path is None:
            raise
        raise InputError(f"{ctx.run.path}: {marked(exc)}") from None
    return ev


def _verify(ctx) -> Evidence:
    run = ctx.run
    # 1. outputs stored beside parameters must be the parameters' outputs
    if ctx.has_parameters and run.has_outputs:
        for name in ctx.order:
            stored = run.outputs(name)
            if stored is not None and ctx.state(name) is not None:
                rebuilt = ctx.outputs(name)
                _compare_outputs(rebuilt, stored, f"outputs.{name}", f"snapshot {name}", "config.model", ctx.model_cfg)
    col = ctx.reference("collapsed")
    if col is not None and col.outputs is not None:
        rebuilt = ctx.reference_outputs("collapsed", source="state")
        if rebuilt is not None:
            cfg, model_where = ctx.reference_model_config("collapsed")
            _compare_outputs(rebuilt, col.outputs, "references.collapsed.outputs", "references.collapsed.state",
                             model_where, cfg)
    # 2. the thresholds and losses, recomputed at their snapshots
    for name in ctx.order:  # every snapshot rebuilt from parameters must give finite outputs (RunContext refuses)
        if ctx.state(name) is not None:
            ctx.outputs(name)
    ev = ctx.evidence  # recompute(ctx), computed once per context
    S = ev.scale
    for r in ev.rounds:
        entry = run.rounds[r.index]
        src = f"the {r.snapshot} snapshot"
        stored = entry.losses.double()
        for c in range(stored.shape[0]):
            _check_loss(f"rounds[{r.index}].losses[{c}]", float(stored[c]), float(r.losses[c]), S, src,
                        f"l_C of clustering {c}, eq. 8; ")
        _check_loss(f"rounds[{r.index}].eps", entry.eps, r.eps, S, src,
                    f"the max of l_C over rounds[{r.index}].kept; ")
    ref = ev.refinement
    if ref is not None:
        stored = run.refinement
        src = f"the {ref.snapshot} snapshot"
        _check_loss("refinement.eps_T", stored.eps_T, ref.eps_T, S, src,
                    f"max(l_a, l_b) over refinement.pair {list(ref.pair)}; ")
        tol = loss_tolerance(ref.eps_T, ref.eps, S)
        said = stored.reached
        contradicts = (ref.eps_T - ref.eps > tol) if said else (ref.eps - ref.eps_T > tol)
        if contradicts:
            rel = ">=" if ref.eps_T >= ref.eps else "<"
            raise InputError(f"refinement.reached is {said} but the {ref.snapshot} snapshot gives eps_T = "
                             f"{ref.eps_T:.6g} {rel} refinement.eps = {ref.eps:.6g} on eval.x (tolerance {tol:.3g}); "
                             f"{_FIX}")
    return ev
