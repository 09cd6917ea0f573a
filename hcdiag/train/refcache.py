"""Shared references: the collapsed model and the vanilla reference trained once per key, for a whole grid.

Within a grid (``hcdiag verify``) every HCT job trains a collapsed model (vanilla at ``collapsed_multiple x
lambda_max``) and a vanilla reference at its own s2, and every baseline a collapsed model: the smoke bench
measured references at 48 of the 84 s of a smoke run, more than HCT itself. Both depend only on the data,
the architecture, s2, the loss convention, the seed and the training settings below, so a folder of
results keyed by a hash of all of them (like the EM cache, :func:`hcdiag.clusterings.fit_clusterings_cached`)
trains each once. One process trains a key while the others wait on a lock file (``fcntl.flock``; without
locks each trains on its own and the last atomic write wins: the same result, more work). A file that cannot
be read back as the reference of that key (truncated, corrupt, another architecture) is retrained and
replaced. Sharing changes no result: a shared reference is bitwise the one the run would train (a test
compares them), and its metrics are computed again on each run's own evaluation rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from hcdiag.errors import InputError

FORMAT = "hcdiag-reference"
VERSION = 1


def reference_key(t, name: str, s2: float) -> dict:
    """Everything reference ``name`` (``collapsed`` or ``vanilla``) at decoder variance ``s2`` depends on."""
    c = t.cfg
    return {"reference": name, "data": t.fingerprint["data"], "model": t.model_cfg.to_dict(), "s2": repr(float(s2)),
            "loss": c.loss, "seed": c.seed, "epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr,
            "snapshots": c.baseline_snapshots if name == "vanilla" else None, "device": t.device.type,
            "deterministic": bool(c.deterministic), "format": VERSION}


def _read(path: Path, key: dict, fits: Callable[[dict], bool]) -> tuple[dict, list] | None:
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(d, dict) and d.get("format") == FORMAT and d.get("key") == key):
            return None
        state, snaps = d["state"], [(str(n), sd) for n, sd in d["snapshots"]]
        if not fits(state) or not all(fits(sd) for _, sd in snaps):
            return None
        return state, snaps
    except Exception:  # noqa: BLE001 (truncated, corrupt or foreign: retrain and replace it)
        return None


def _write(path: Path, key: dict, state: dict, snaps: list) -> None:
    from hcdiag.atomic import temporary

    fd, tmp = temporary(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            torch.save({"format": FORMAT, "version": VERSION, "key": key, "state": state,
                        "snapshots": [[n, sd] for n, sd in snaps]}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def shared(folder, key: dict, train: Callable[[], tuple[dict, list]], fits: Callable[[dict], bool]
           ) -> tuple[dict, list, bool]:
    """``train()`` -> ``(state_dict, [(name, state_dict), ...])`` through the folder ``folder`` (None: train
    every time). ``fits(state)`` says whether a read state is the model's. Returns ``(state, snapshots, hit)``."""
    if folder is None:
        return (*train(), False)
    from hcdiag.clusterings import fingerprint

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the reference cache folder {folder}: {exc.strerror}; choose a writable "
                         "folder.") from None
    digest = fingerprint(settings=key)[:32]
    path = folder / f"ref-{key['reference']}-{digest}.pt"
    from hcdiag.atomic import cache_lock

    with cache_lock(folder / (path.stem + ".lock")):
        if path.exists() and (got := _read(path, key, fits)) is not None:
            return (*got, True)
        state, snaps = train()
        try:
            _write(path, key, state, snaps)
        except Exception:  # noqa: BLE001 (a full or read-only cache (torch.save raises RuntimeError on a full
            pass           # disk) costs the next run a retraining, never this run)
        return state, snaps, False


__all__ = ["reference_key", "shared"]
