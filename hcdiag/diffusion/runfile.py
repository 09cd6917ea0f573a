"""Run files of diffusion runs (issue 14): what :func:`hcdiag.diffusion.train.train_diffusion` returns, written
and read with the VAE run files' safety (:func:`hcdiag.runfile.write_atomic`, :func:`hcdiag.runfile.read_torch_file`:
atomic, weights-only, bounded) and validated on load, every problem one line.

Layout (``format: hcdiag-diffusion-run``, ``version: 2``): ``status`` ``{"complete": bool}``; ``config`` (the
:class:`~hcdiag.diffusion.train.DiffusionConfig` fields); ``data`` (``name``, ``n``, ``d``, ``x``: the (n, d)
float32 rows the run trained and validated on, as :func:`hcdiag.diffusion.data.prepare` made them, and ``spec``:
how they were made; the checks recompute lambda_max and the truth from these, never from a stored number);
``schedules`` (one dict per schedule: ``kind``, ``T`` and its parameters); ``model`` (``config``: the denoiser's
``dim``, ``widths``, ``emb_dim``, ``conditioning``, ``n_schedules``; ``state``: its parameters); ``rounds`` (per
Algorithm 2 round: ``active``, ``val_loss``, ``kept``); ``history`` (mean training loss per round or run);
``train_rows``, ``val_rows`` (Algorithm 2's selection rows), ``test_rows`` (held out from both: the checks judge on
them), recomputed from the config's seed and required to agree; ``steps``, ``budget``; and, in a partial file (``complete`` false)
only, ``resume`` (``optimizer``, ``generator``, ``position``: what :func:`train_diffusion` needs to continue
exactly). Version 1 files (without the rows) are refused: the checks could not recompute anything. The schedules are recomputed from the config and must agree
(a file's schedules are never trusted on their own).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hcdiag.diffusion.model import Denoiser
from hcdiag.diffusion.schedules import Schedule
from hcdiag.diffusion.train import CONDITIONING, DiffusionConfig, split_rows
from hcdiag.errors import InputError, marked

FORMAT = "hcdiag-diffusion-run"
VERSION = 2
_SCHEDULE_KEYS = ("kind", "T", "beta_start", "beta_end", "s", "max_beta")


def _schedule_dict(s: Schedule) -> dict:
    return {k: getattr(s, k) for k in _SCHEDULE_KEYS}


def run_dict(out: dict, data) -> dict:
    """The run file's dict of a :func:`train_diffusion` result (partial when it holds ``"resume"``, what the
    ``checkpoint`` callback receives) and the :class:`~hcdiag.diffusion.data.DiffusionData` it trained on."""
    model: Denoiser = out["model"]
    cfg: DiffusionConfig = out["config"]
    x = torch.tensor(np.asarray(data.x, dtype=np.float32))  # a copy: the file never aliases the caller's rows
    d = {"format": FORMAT, "version": VERSION, "status": {"complete": "resume" not in out},
            "config": cfg.to_dict(),
            "data": {"name": str(data.spec.get("name")), "n": int(x.shape[0]), "d": int(x.shape[1]), "x": x,
                     "spec": dict(data.spec)},
            "schedules": [_schedule_dict(s) for s in out["schedules"]],
            "model": {"config": dict(model.config),
                      "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}},
            "rounds": [{"active": torch.as_tensor(r["active"], dtype=torch.int64),
                        "val_loss": torch.as_tensor(r["val_loss"], dtype=torch.float64),
                        "kept": torch.as_tensor(r["kept"], dtype=torch.int64)} for r in out["rounds"]],
            "history": torch.as_tensor(out["history"], dtype=torch.float64),
            "train_rows": torch.as_tensor(out["train_rows"], dtype=torch.int64),
            "val_rows": torch.as_tensor(out["val_rows"], dtype=torch.int64),
            "test_rows": torch.as_tensor(out["test_rows"], dtype=torch.int64), "steps": int(out["steps"]),
            "budget": int(out["budget"])}
    if "resume" in out:
        d["resume"] = out["resume"]
    return d


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
    test_rows: torch.Tensor
    steps: int
    budget: int
    x: torch.Tensor
    spec: dict
    complete: bool
    resume: dict | None

    def resume_state(self) -> dict:
        """What :func:`train_diffusion`'s ``resume`` takes (a partial file only)."""
        if self.resume is None:
            raise InputError(f"{self.path or 'the run'} is complete; there is nothing to resume.")
        return {**self.resume, "model_state": self.model.state_dict(), "history": self.history.tolist(),
                "rounds": [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in r.items()}
                           for r in self.rounds], "train_rows": self.train_rows.numpy()}


def _need(d: Any, key: str, where: str):
    if not isinstance(d, dict):
        raise InputError(f"{where} must be a dict; got {type(d).__name__}.")
    if key not in d:
        raise InputError(f"{where}.{key} is missing; a diffusion run file needs it (hcdiag.diffusion.runfile).")
    return d[key]


def _is_int(v: Any, want: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v == want


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
    if d.get("version") == 1:
        raise InputError("version 1 diffusion run files do not hold the rows they trained on, so nothing in them can "
                         "be rechecked; train the run again (hcdiag train-diffusion).")
    if d.get("version") != VERSION:
        raise InputError(f"version {d.get('version')!r} is not one this hcdiag reads ({VERSION}); upgrade hcdiag.")
    raw = _need(d, "config", "run")
    if not isinstance(raw, dict):
        raise InputError(f"run.config must be a dict; got {type(raw).__name__}.")
    raw = dict(raw)
    names = {f.name for f in fields(DiffusionConfig)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise InputError(f"config has unknown key(s) {', '.join(unknown)}; fix the producer.")
    if isinstance(raw.get("widths"), list):
        raw["widths"] = tuple(raw["widths"])
    try:
        cfg = DiffusionConfig(**raw)
    except InputError as exc:
        raise InputError(f"config: {marked(exc)}") from None
    except (TypeError, ValueError) as exc:
        raise InputError(f"config cannot be read ({str(exc)}).") from None
    if cfg.widths is None:  # training records the widths it used (DiffusionConfig.resolved)
        raise InputError("config.widths is missing (a run file records the hidden widths it was trained with); fix "
                         "the producer.")
    scheds = _need(d, "schedules", "run")
    try:
        want = cfg.schedules()
    except InputError as exc:
        raise InputError(f"config: {marked(exc)}") from None
    if not isinstance(scheds, list) or len(scheds) != len(want):
        raise InputError(f"schedules must be a list of R = {cfg.R} schedules; got "
                         f"{len(scheds) if isinstance(scheds, list) else type(scheds).__name__}.")
    for i, (got, w) in enumerate(zip(scheds, want)):
        if got != _schedule_dict(w):
            raise InputError(f"schedules[{i}] {got!r} differs from the family its config names ({w.spec}); the "
                             "schedules are recomputed from the config, so the file is inconsistent: fix the producer.")
    data = _need(d, "data", "run")
    x = _need(data, "x", "data")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.ndim != 2 or x.shape[0] < 2:
        raise InputError(f"data.x must be the (n, d) float32 tensor of the rows the run trained on (n >= 2); got "
                         f"{type(x).__name__}{f' {x.dtype} of shape {tuple(x.shape)}' if isinstance(x, torch.Tensor) else ''}.")
    if not bool(torch.isfinite(x).all()):
        raise InputError("data.x holds NaN or inf; a run cannot have trained on it.")
    n, dim = int(x.shape[0]), int(x.shape[1])
    if not (_is_int(_need(data, "n", "data"), n) and _is_int(_need(data, "d", "data"), dim)):
        raise InputError(f"data.n and data.d ({data.get('n')!r}, {data.get('d')!r}) disagree with data.x's shape "
                         f"({n}, {dim}).")
    spec = _need(data, "spec", "data")
    if not isinstance(spec, dict):
        raise InputError(f"data.spec must be a dict; got {type(spec).__name__}.")
    m = _need(d, "model", "run")
    mc = _need(m, "config", "model")
    if not isinstance(mc, dict):
        raise InputError(f"model.config must be a dict; got {type(mc).__name__}.")
    if mc.get("conditioning") != CONDITIONING[cfg.method]:
        raise InputError(f"model.config.conditioning {mc.get('conditioning')!r} is not what method {cfg.method!r} "
                         f"trains ({CONDITIONING[cfg.method]!r}); the file is inconsistent: fix the producer.")
    if not (_is_int(mc.get("dim"), dim) and _is_int(mc.get("n_schedules"), cfg.R)):
        raise InputError(f"model.config has dim {mc.get('dim')!r} and n_schedules {mc.get('n_schedules')!r}; the data "
                         f"has d = {dim} and the config R = {cfg.R}.")
    if mc.get("widths") != list(cfg.widths) or mc.get("emb_dim") != cfg.emb_dim:
        raise InputError(f"model.config's widths and emb_dim ({mc.get('widths')!r}, {mc.get('emb_dim')!r}) differ from "
                         f"the config's ({list(cfg.widths)}, {cfg.emb_dim}); fix the producer.")
    try:
        model = Denoiser(mc["dim"], widths=tuple(mc["widths"]), emb_dim=mc["emb_dim"], conditioning=mc["conditioning"],
                         n_schedules=mc["n_schedules"])
        model.load_state_dict(_need(m, "state", "model"))
    except (KeyError, TypeError, ValueError, RuntimeError, InputError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"model cannot be rebuilt from model.config and model.state ({first}).") from None
    model.eval()
    rounds = _need(d, "rounds", "run")
    if not isinstance(rounds, list):
        raise InputError(f"rounds must be a list; got {type(rounds).__name__}.")
    if rounds and cfg.method != "consensus":
        raise InputError(f"a {cfg.method} run has no Algorithm 2 rounds; this one has {len(rounds)}.")
    for i, r in enumerate(rounds):
        active = _ints(_need(r, "active", f"rounds[{i}]"), f"rounds[{i}].active", cfg.R)
        kept = _ints(_need(r, "kept", f"rounds[{i}]"), f"rounds[{i}].kept", cfg.R)
        vl = _need(r, "val_loss", f"rounds[{i}]")
        if not isinstance(vl, torch.Tensor) or vl.shape != active.shape:
            raise InputError(f"rounds[{i}].val_loss must be a tensor with one loss per active schedule "
                             f"({active.numel()}).")
        if not set(kept.tolist()) <= set(active.tolist()):
            raise InputError(f"rounds[{i}].kept holds schedules that are not active; kept must be a subset of active.")
        prev = list(range(cfg.R)) if i == 0 else sorted(rounds[i - 1]["kept"].tolist())
        if sorted(active.tolist()) != prev or len(set(kept.tolist())) != kept.numel() or \
                kept.numel() != active.numel() // 2:
            raise InputError(f"rounds[{i}] does not follow Algorithm 2 (active must be the previous round's kept, all R "
                             "schedules in round 0, and kept half of active); fix the producer.")
    train_rows = _ints(_need(d, "train_rows", "run"), "train_rows", n)
    val_rows = _ints(_need(d, "val_rows", "run"), "val_rows", n)
    test_rows = _ints(_need(d, "test_rows", "run"), "test_rows", n)
    if set(train_rows.tolist()) & (set(val_rows.tolist()) | set(test_rows.tolist())) or \
            set(val_rows.tolist()) & set(test_rows.tolist()):
        raise InputError("train_rows, val_rows and test_rows overlap; selection and test rows must be held out.")
    want_split = split_rows(n, cfg.val_rows, cfg.test_rows, cfg.seed)
    if any(got.tolist() != w.tolist() for got, w in zip((train_rows, val_rows, test_rows), want_split)):
        raise InputError("the run file's row split is not the one its config's seed makes (recomputed); the held-out "
                         "rows cannot be trusted: fix the producer.")
    status = _need(d, "status", "run")
    complete = _need(status, "complete", "status")
    steps, budget = _need(d, "steps", "run"), _need(d, "budget", "run")
    if not (isinstance(steps, int) and isinstance(budget, int) and 0 <= steps <= budget and budget == cfg.budget()):
        raise InputError(f"steps {steps!r} and budget {budget!r} must be integers with 0 <= steps <= budget = "
                         f"{cfg.budget()} (the config's step budget).")
    if complete is not True and complete is not False:
        raise InputError(f"status.complete must be true or false; got {complete!r}.")
    if complete and steps != budget:
        raise InputError(f"the run says it is complete but took {steps} of its {budget} steps.")
    if complete and len(rounds) != cfg.R.bit_length() - 2 and cfg.method == "consensus":
        raise InputError(f"a complete consensus run has {cfg.R.bit_length() - 2} rounds (R = {cfg.R} halved to 2); "
                         f"this one has {len(rounds)}.")
    history = _need(d, "history", "run")
    if not isinstance(history, torch.Tensor) or history.ndim != 1:
        raise InputError("history must be a 1-D tensor of mean training losses.")
    resume = d.get("resume")
    if complete and resume is not None:
        raise InputError("a complete run holds no resume state; fix the producer.")
    if not complete:
        if not isinstance(resume, dict):
            raise InputError("a partial run file (status.complete false) must hold its resume state (resume: "
                             "optimizer, generator, position); fix the producer.")
        for key in ("optimizer", "generator", "position"):
            _need(resume, key, "resume")
        g = resume["generator"]
        if not isinstance(g, torch.Tensor) or g.dtype != torch.uint8:
            raise InputError("resume.generator must be a torch generator state (uint8 tensor).")
        pos = resume["position"]
        for key in ("active", "cycle", "loss_sum", "loss_count", "steps"):
            _need(pos, key, "resume.position")
        if not _is_int(pos["steps"], steps):
            raise InputError(f"resume.position.steps ({pos['steps']!r}) differs from steps ({steps}).")
        want_active = (sorted(rounds[-1]["kept"].tolist()) if rounds else list(range(cfg.R))) \
            if cfg.method == "consensus" else []
        c, ls, lc = pos["cycle"], pos["loss_sum"], pos["loss_count"]
        if not (isinstance(pos["active"], list) and pos["active"] == want_active and isinstance(c, int)
                and 0 <= c <= cfg.epochs_per_round and isinstance(ls, float) and math.isfinite(ls)
                and isinstance(lc, int) and 0 <= lc <= steps):
            raise InputError("resume.position is inconsistent (active must be the last round's kept schedules, cycle "
                             f"an integer in 0..{cfg.epochs_per_round}, loss_sum finite, loss_count in 0..steps); "
                             "the run cannot be continued: train it again.")
    return DiffusionRun(path, cfg, want, model, rounds, history, train_rows, val_rows, test_rows, steps, budget, x,
                        dict(spec),
                        complete, resume)


def save_diffusion_run(out: dict, path: str | os.PathLike, data) -> Path:
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
