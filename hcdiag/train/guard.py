"""What a run may write and continue: ``--out`` is never the data, never replaced unless asked, written by one
trainer at a time; ``--resume`` continues only a run of the same data and settings (``config.fingerprint``).

Functions of the trainer ``t`` (its ``out``, ``dataset``, evaluation rows, ``fingerprint`` and
``config_dict()``); every refusal is one line (:class:`hcdiag.errors.InputError`) and writes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from hcdiag.errors import InputError, flag

# what the messages name: the command line's flags, or the trainer's own parameters
_OUT, _RESUME, _OVERWRITE = flag("--out", "out"), flag("--resume", "resume"), flag("--overwrite", "overwrite=True")


def claim_out(t, *, resume: bool, overwrite: bool):
    """Refuse an ``out`` that is the input data or that exists without resume/overwrite, then lock
    it. Nothing is written or removed when refusing (the lock file is our own, made and removed)."""
    from hcdiag.atomic import OutputBusy, OutputLock

    out = t.out
    check_writable(out)
    source = getattr(t.dataset, "source", None)
    if source and out.exists():
        src = Path(source)
        if src.is_file() and os.path.samefile(out, src):  # same inode: hard links and symlinks too
            raise InputError(f"{_OUT} {out} is the data file this run reads ({src}); writing the run there would "
                             f"destroy the data: choose another {_OUT}.")
        if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
            raise InputError(f"{_OUT} {out} is a file in the data folder {src} that this run reads; write the run "
                             f"file outside it (another {_OUT}).")
    lock = OutputLock(out, owner="train")
    try:
        lock.acquire()
    except OutputBusy as busy:
        who = f"another hcdiag train (pid {busy.pid})" if busy.pid else "another hcdiag train"
        raise InputError(f"{_OUT} {out} is being written by {who}; wait for it to finish or choose another "
                         f"{_OUT}.") from None
    except OSError as exc:
        raise InputError(f"{_OUT} {out}: cannot create its lock file {lock.path} ({exc.strerror}); choose a "
                         "writable folder.") from None
    if out.exists() and not resume and not overwrite:
        lock.release()
        raise InputError(f"{_OUT} {out} already exists; pass {flag('--resume', 'resume=True')} to continue it, "
                         f"{_OVERWRITE} to replace it, or choose another {_OUT}.")
    return lock


# config.hct entries derived from the settings (config.train, which is compared) that older run files lack
_DERIVED_HCT = ("steps_per_epoch",)


def load_for_resume(t) -> dict | None:
    from hcdiag.runfile import load_run

    if t.out is None or not t.out.exists():
        return None  # nothing to resume: start fresh
    prev = load_run(t.out, partial=True).data
    prev.setdefault("config", {})
    resume = prev.get("resume")
    if resume is not None and not (isinstance(resume, dict) and isinstance(resume.get("position"), dict)
                                   and isinstance(resume["position"].get("stage"), str)):
        raise InputError(f"{_RESUME}: {t.out} holds a checkpoint without a readable position (resume.position.stage): "
                         f"a damaged or edited file; train it again with {_OVERWRITE}.")
    was = str(prev["config"].get("device") or "").split(":")[0]
    if resume is not None and was in ("cpu", "cuda") and was != t.device.type:
        # the saved noise generator is a state of that device's generator (CPU and CUDA ones differ in kind)
        raise InputError(f"{_RESUME}: {t.out} was trained on {was}, and its saved random streams belong to that "
                         f"device; resume it there ({flag(f'--device {was}', f'device={was!r}')}) or train it again "
                         f"here with {_OVERWRITE}.")
    check_same_data(t, prev)
    mine = t.config_dict()
    if "resume_format" not in prev["config"]:  # written before the key: its saves are at rounds and stages, which
        prev["config"]["resume_format"] = mine["resume_format"]  # this hcdiag resumes
    known = _settings_it_knew(prev["config"], mine["train"])
    old_hct, my_hct = prev["config"].get("hct"), mine.get("hct")
    if isinstance(old_hct, dict) and isinstance(my_hct, dict):  # records an older file predates, derived from settings
        mine = {**mine, "hct": {k: v for k, v in my_hct.items() if k in old_hct or k not in _DERIVED_HCT}}
    diff = config_diff(prev["config"], mine)
    if prev["config"].get("fingerprint"):  # the same data, fingerprinted: where it was read from is moot
        diff = [d for d in diff if d != "dataset.source"]
    stored = (prev["config"].get("fingerprint") or {}).get("settings")
    if not diff and stored is not None and stored != t.fingerprint["settings"] and stored != _settings_hash(
            {k: v for k, v in mine["train"].items() if k in known}):
        # a change _config_diff's rounding hides (a float below 1e-12): name it exactly
        old = prev["config"].get("train") or {}
        diff = [f"train.{k}" for k in sorted(set(old) | set(mine["train"]))
                if k != "device" and old.get(k) != mine["train"].get(k)] or ["fingerprint.settings"]
    if diff:
        raise InputError(f"{_RESUME}: {t.out} was written with another config (keys differ: {', '.join(diff)}); "
                         f"use the same {flag('flags', 'settings')} or another {_OUT}.")
    prev["config"]["fingerprint"] = t.fingerprint
    if prev.get("status", {}).get("complete", True) and "resume" not in prev:
        return {"complete": prev}
    return prev

def _settings_it_knew(old_config: dict, mine: dict) -> set[str]:
    """The settings an older run file records (``config.train``), after filling in those it predates.

    A setting added to hcdiag after the file was written is missing from its ``config.train``; at its
    default value it changes nothing of that run, so it is filled in (and written at the next save) rather
    than read as a changed config. At another value it stays missing, and the config check names it."""
    from dataclasses import fields

    from hcdiag.train.config import TrainConfig

    old = old_config.get("train")
    if not isinstance(old, dict):
        return set(mine)
    known = set(old)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for k, v in mine.items():
        if k not in old and k in defaults and v == defaults[k]:
            old[k] = v
    return known


def _settings_hash(settings: dict) -> str:
    from hcdiag.clusterings import fingerprint

    return fingerprint(settings={k: v for k, v in settings.items() if k != "device"})


def check_same_data(t, prev: dict) -> None:
    """Refuse to resume a run trained on other data (a negated or permuted copy included).

    Run files keep ``config.fingerprint.data`` (:func:`hcdiag.clusterings.fingerprint` of the float32
    data). Decision for run files written before fingerprints existed: they are resumed, with a
    warning, when their stored evaluation rows and data mean equal this data's (rows drawn by the
    same seed, so a negated or permuted data set differs there), and refused otherwise. The
    fingerprint is added at the next save. Refusing them outright would throw away the partial runs
    of an interrupted ``hcdiag verify`` grid, which resumes its runs."""
    stored = (prev["config"].get("fingerprint") or {}).get("data")
    if stored == t.fingerprint["data"]:
        return
    ev = prev.get("eval") or {}
    ex, xbar, rows_at = ev.get("x"), ev.get("xbar"), ev.get("rows")
    old_n, old_N = (prev["config"].get("dataset") or {}).get("n"), None
    if isinstance(ex, torch.Tensor) and ex.ndim == 2:
        old_N = int(ex.shape[1])
    mine_x = t.eval_x.cpu()
    same_rows = (isinstance(rows_at, torch.Tensor) and isinstance(ex, torch.Tensor) and ex.shape == mine_x.shape
                 and np.array_equal(rows_at.cpu().numpy(), t.eval_idx))
    if old_N is not None and (old_N != t.N or (old_n is not None and int(old_n) != t.n)):
        what = f"it had {old_n if old_n is not None else '?'} rows x {old_N} columns, this data {t.n} x {t.N}"
    elif not same_rows:  # its evaluation rows were drawn with another seed or count: nothing to compare
        if stored is None:
            return  # an unfingerprinted file: the config check names the setting (seed, eval_rows)
        what = f"same shape {t.n} x {t.N}, other values"
    else:
        rows = int((ex.to(mine_x.dtype) != mine_x).any(1).sum())
        same_mean = isinstance(xbar, torch.Tensor) and xbar.shape == t.xbar.shape and torch.allclose(
            xbar.double(), t.xbar.double().cpu(), rtol=1e-6, atol=1e-6 * float(t.xbar.abs().max()))
        if stored is None and rows == 0 and same_mean:
            import warnings

            from hcdiag.errors import HcdiagWarning

            warnings.warn(f"{_RESUME}: {t.out} has no data fingerprint (written by an earlier hcdiag); its "
                          f"{len(mine_x)} evaluation rows and data mean match this data, so it is resumed.",
                          HcdiagWarning, stacklevel=2)
            return
        what = (f"same shape {t.n} x {t.N}, other values: {rows} of its {len(mine_x)} evaluation rows differ"
                if rows else f"same shape {t.n} x {t.N} and evaluation rows, other values elsewhere")
    raise InputError(f"{_RESUME}: {t.out} was trained on other data ({what}); resume with the data it was "
                     f"trained on, or start a new run with another {_OUT} (or {_OVERWRITE}).")


def fingerprints(c, x: np.ndarray) -> dict:
    """``config.fingerprint`` of a run file: SHA-256 of the float32 data (shape and bytes) and of every
    setting but the device (:func:`hcdiag.clusterings.fingerprint`, the EM cache's hash). --resume refuses
    a run whose fingerprints differ from the command's."""
    from hcdiag.clusterings import fingerprint

    return {"data": fingerprint(x), "settings": _settings_hash(c.to_dict())}


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    ignore = {"versions", "device", "fingerprint"}  # fingerprints are compared on their own, first
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_diff(va, vb, f"{prefix}{k}.")
        elif _norm(va) != _norm(vb):
            diffs.append(f"{prefix}{k}")
    return diffs


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float):
        return round(v, 12)
    return v


def check_writable(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        raise InputError(f"{_OUT} {path} is a directory; give a file name such as {path / 'run.pt'}.")
    if not folder.exists():
        raise InputError(f"{_OUT} {path}: the folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{_OUT} {path}: the folder {folder} is not writable; choose another {_OUT}.")
