"""Run files of diffusion runs (issue 14): what :func:`hcdiag.diffusion.train.train_diffusion` returns, written
and read with the VAE run files' safety (:func:`hcdiag.runfile.write_atomic`, :func:`hcdiag.runfile.read_torch_file`:
atomic, weights-only, bounded) and validated on load, every problem one line.

Layout (``format: hcdiag-diffusion-run``, ``version: 1``): ``status`` ``{"complete": bool}``; ``config`` (the
:class:`~hcdiag.diffusion.train.DiffusionConfig` fields); ``data`` (``name``, ``n``, ``d``, ``lambda_max``);
``schedules`` (one dict per schedule: ``kind``, ``T`` and its parameters); ``model`` (``config``: the denoiser's
``dim``, ``widths``, ``emb_dim``, ``conditioning``, ``n_schedules``; ``state``: its parameters); ``rounds`` (per
Algorithm 2 round: ``active``, ``val_loss``, ``kept``); ``history`` (mean training loss per round or run);
``train_rows``, ``val_rows`` (row indices); ``steps``. The schedules are recomputed from the config and must agree
(a file's schedules are never trusted on their own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from hcdiag.diffusion.model import Denoiser
from hcdiag.diffusion.schedules import Schedule
from hcdiag.diffusion.train import DiffusionConfig
from hcdiag.errors import InputError, marked

FORMAT = "hcdiag-diffusion-run"
VERSION = 1
_SCHEDULE_KEYS = ("kind", "T", "beta_start", "beta_end", "s", "max_beta")


def _schedule_dict(s: Schedule) -> dict:
    return {k: getattr(s, k) for k in _SCHEDULE_KEYS}


def run_dict(out: dict, data: dict, *, complete: bool = True) -> dict:
    """The run file's dict of a :func:`train_diffusion` result and the data's ``name``, ``n``, ``d``,
    ``lambda_max``."""
    model: Denoiser = out["model"]
    cfg: DiffusionConfig = out["config"]
    return {"format": FORMAT, "version": VERSION, "status": {"complete": bool(complete)},
            "config": cfg.to_dict(), "data": dict(data),
            "schedules": [_schedule_dict(s) for s in out["schedules"]],
            "model": {"config": dict(model.config),
                      "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}},
            "rounds": [{"active": torch.as_tensor(r["active"], dtype=torch.int64),
                        "val_loss": torch.as_tensor(r["val_loss"], dtype=torch.float64),
                        "kept": torch.as_tensor(r["kept"], dtype=torch.int64)} for r in out["rounds"]],
            "history": torch.as_tensor(out["history"], dtype=torch.float64),
            "train_rows": torch.as_tensor(out["train_rows"], dtype=torch.int64),
            "val_rows": torch.as_tensor(out["val_rows"], dtype=torch.int64), "steps": int(out["steps"])}


@dataclass(frozen=True, eq=False)
class DiffusionRun:
    """A validated diffusion run file: its config, schedules, rebuilt denoiser (eval mode), rounds and rows."""

    path: Path | None
    config: DiffusionConfig
    schedules: list
    model: Denoiser
    rounds: list
    history: torch.Tensor
    train_rows: torch.Tensor
    val_rows: torch.Tensor
    steps: int
    data: dict
    complete: bool


def _need(d: Any, key: str, where: str):
    if not isinstance(d, dict):
        raise InputError(f"{where} must be a dict; got {type(d).__name__}.")
    if key not in d:
        raise InputError(f"{where}.{key} is missing; a diffusion run file needs it (hcdiag.diffusion.runfile).")
    return d[key]


def _ints(v: Any, where: str, n: int | None = None) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dtype != torch.int64 or v.ndim != 1:
        raise InputError(f"{where} must be a 1-D int64 tensor; got {type(v).__name__}"
                         f"{'' if not isinstance(v, torch.Tensor) else f' {v.dtype} of shape {tuple(v.shape)}'}.")
    if n is not None and v.numel() and (int(v.min()) < 0 or int(v.max()) >= n):
        raise InputError(f"{where} holds indices outside 0..{n - 1}.")
    return v


def validate(d: Any, path: Path | None = None) -> DiffusionRun:
    """A :class:`DiffusionRun` from a run file's dict, or one :class:`InputError` line saying what is wrong."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise InputError(f"not a diffusion run file (format {got!r}, expected {FORMAT!r}); write it with "
                         "hcdiag.diffusion.runfile.save_diffusion_run.")
    if d.get("version") != VERSION:
        raise InputError(f"version {d.get('version')!r} is not one this hcdiag reads ({VERSION}); upgrade hcdiag.")
    raw = dict(_need(d, "config", "run"))
    names = {f.name for f in fields(DiffusionConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise InputError(f"config has unknown key(s) {', '.join(unknown)}; fix the producer.")
    if "widths" in raw:
        raw["widths"] = tuple(raw["widths"])
    try:
        cfg = DiffusionConfig(**raw)
    except TypeError as exc:
        raise InputError(f"config cannot be read ({str(exc)}).") from None
    except InputError as exc:
        raise InputError(f"config: {marked(exc)}") from None
    scheds = _need(d, "schedules", "run")
    want = cfg.schedules()
    if not isinstance(scheds, list) or len(scheds) != len(want):
        raise InputError(f"schedules must be a list of R = {cfg.R} schedules; got "
                         f"{len(scheds) if isinstance(scheds, list) else type(scheds).__name__}.")
    for i, (got, w) in enumerate(zip(scheds, want)):
        if got != _schedule_dict(w):
            raise InputError(f"schedules[{i}] {got!r} differs from the family its config names ({w.spec}); the "
                             "schedules are recomputed from the config, so the file is inconsistent: fix the producer.")
    data = _need(d, "data", "run")
    n = int(_need(data, "n", "data"))
    dim = int(_need(data, "d", "data"))
    m = _need(d, "model", "run")
    mc = dict(_need(m, "config", "model"))
    if mc.get("dim") != dim or mc.get("n_schedules") != cfg.R:
        raise InputError(f"model.config has dim {mc.get('dim')!r} and n_schedules {mc.get('n_schedules')!r}; the data "
                         f"has d = {dim} and the config R = {cfg.R}.")
    try:
        model = Denoiser(mc["dim"], widths=tuple(mc["widths"]), emb_dim=mc["emb_dim"], conditioning=mc["conditioning"],
                         n_schedules=mc["n_schedules"])
        model.load_state_dict(_need(m, "state", "model"))
    except (KeyError, TypeError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model cannot be rebuilt from model.config and model.state ({first}).") from None
    model.eval()
    rounds = _need(d, "rounds", "run")
    if not isinstance(rounds, list):
        raise InputError(f"rounds must be a list; got {type(rounds).__name__}.")
    for i, r in enumerate(rounds):
        active = _ints(_need(r, "active", f"rounds[{i}]"), f"rounds[{i}].active", cfg.R)
        kept = _ints(_need(r, "kept", f"rounds[{i}]"), f"rounds[{i}].kept", cfg.R)
        vl = _need(r, "val_loss", f"rounds[{i}]")
        if not isinstance(vl, torch.Tensor) or vl.shape != active.shape:
            raise InputError(f"rounds[{i}].val_loss must be a tensor with one loss per active schedule "
                             f"({active.numel()}).")
        if not set(kept.tolist()) <= set(active.tolist()):
            raise InputError(f"rounds[{i}].kept holds schedules that are not active; kept must be a subset of active.")
    train_rows = _ints(_need(d, "train_rows", "run"), "train_rows", n)
    val_rows = _ints(_need(d, "val_rows", "run"), "val_rows", n)
    if set(train_rows.tolist()) & set(val_rows.tolist()):
        raise InputError("train_rows and val_rows overlap; validation rows must be held out.")
    status = _need(d, "status", "run")
    return DiffusionRun(path, cfg, want, model, rounds, torch.as_tensor(_need(d, "history", "run")), train_rows,
                        val_rows, int(_need(d, "steps", "run")), dict(data), bool(_need(status, "complete", "status")))


def save_diffusion_run(out: dict, path: str | os.PathLike, data: dict) -> Path:
    """Validate the run's dict (:func:`run_dict`) and write it atomically; returns the path."""
    from hcdiag.runfile import write_atomic

    p = Path(path)
    d = run_dict(out, data)
    try:
        validate(d)
    except InputError as exc:
        raise InputError(f"refusing to write {p}: {marked(exc)}") from None
    return write_atomic(d, p)


def load_diffusion_run(path: str | os.PathLike, *, max_memory: int | None = None) -> DiffusionRun:
    """Read a diffusion run file safely (weights only, bounded) and validate it; one line per problem."""
    from hcdiag.runfile import read_torch_file

    p = Path(path)
    d = read_torch_file(p, max_memory=max_memory)
    try:
        return validate(d, p)
    except InputError as exc:
        raise InputError(f"{p}: {marked(exc)}") from None


__all__ = ["DiffusionRun", "FORMAT", "load_diffusion_run", "run_dict", "save_diffusion_run", "validate"]
