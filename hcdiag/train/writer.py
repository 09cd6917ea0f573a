"""The run being written: snapshots, history rows, saves with the state ``--resume`` continues, and the
atomic write of the run file (the contract of :mod:`hcdiag.runfile`, version 1).

The run dict's top-level keys are spelled here and in :mod:`hcdiag.train.trainer` (the dict's skeleton)
only; methods add typed records (:mod:`hcdiag.records`: HCT's rounds, refinement and stage 3, the references,
the aggressive baseline's record) through :class:`RunWriter`, which stores their version-1 dicts.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from hcdiag.errors import InputError, flag, marked
from hcdiag.records import Aggressive, Reference, Refinement, Round, Stage3

STAGE_CODES = {"stage0": 0, "stage1": 1, "stage2": 2, "stage3": 3, "baseline": 1, "reference": 4}
HISTORY_KEYS = ("step", "epoch", "stage", "loss", "recon", "kl_train", "cluster", "kl", "au", "losses")


def cpu_state(sd: dict) -> dict:
    """A detached CPU copy of a state_dict (what a snapshot stores)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def snapshot_marks(epochs: int, count: int) -> set[int]:
    """Epoch numbers (1-based) at which to snapshot: ``count`` evenly spaced, the last one included."""
    if epochs <= 0 or count <= 0:
        return set()
    return {max(1, round(epochs * (i + 1) / count)) for i in range(count)}


def finalize_history(run: dict) -> dict:
    """History lists to tensors (the run file stores tensors); idempotent."""
    h = run.get("history")
    if not h:
        return run
    out = dict(run)
    hh = {}
    for k, v in h.items():
        if isinstance(v, torch.Tensor):
            hh[k] = v
        elif k == "losses":
            hh[k] = torch.stack(v).double() if v else torch.zeros(0, run["clusterings"]["centroids"].shape[0], dtype=torch.float64)
        elif k in ("step", "epoch", "stage", "au"):
            hh[k] = torch.tensor(v, dtype=torch.int64)
        else:
            hh[k] = torch.tensor(v, dtype=torch.float64)
    out["history"] = hh
    return out


def history_lists(h: dict) -> dict:
    """The stored history (tensors) back to lists that training appends to (on resume)."""
    out = {k: [] for k in HISTORY_KEYS}
    for k in HISTORY_KEYS:
        v = h.get(k)
        if v is None:
            continue
        out[k] = list(v.unbind(0)) if k == "losses" else (v.tolist() if isinstance(v, torch.Tensor) else list(v))
    inner = h.get("inner_steps")  # the aggressive baseline's series, absent elsewhere
    if inner is not None:
        out["inner_steps"] = inner.tolist() if isinstance(inner, torch.Tensor) else list(inner)
    return out


def saved_rows(h: dict, resume: dict) -> int:
    """History rows that belong to the state a resume entry holds: those recorded up to its save. A run
    stopped by a non-finite loss keeps the rows after it (up to the stop), which training records again."""
    if "history_rows" in resume:
        return int(resume["history_rows"])
    steps = h.get("step") or []
    if resume.get("position", {}).get("stage") not in ("stage1", "stage2", "stage3"):
        return len(steps)  # references record no rows (and their saves carry a fresh state, step 0)
    n = 0  # older files: the rows up to the saved step (steps only grow in hct's stages 1-3)
    while n < len(steps) and steps[n] <= int(resume["step"]):
        n += 1
    return n


class RunWriter:
    """Writes one run: ``run`` (the dict being built), ``out`` (the run file, or None to keep it in memory),
    evaluating through ``loop`` and reporting to ``progress``."""

    def __init__(self, run: dict, out: Path | None, loop, progress):
        self.run, self.out, self.loop, self.progress = run, out, loop, progress
        self.has_save = False  # whether the run file holds a state of this run that --resume continues
        self.timings: dict | None = None  # the trainer's timings (seconds by part), written with every save

    def snapshot(self, model, name: str) -> None:
        """Store the model's parameters as snapshot ``name`` (in training order)."""
        self.add_state(name, cpu_state(model.state_dict()))

    def add_state(self, name: str, state: dict) -> None:
        """Store ``state`` (a CPU state_dict) as snapshot ``name`` (in training order)."""
        self.run["snapshots"][name] = state
        if name not in self.run["snapshot_order"]:
            self.run["snapshot_order"].append(name)

    def resume_position(self) -> dict | None:
        """Where the last save left off (``{"stage": ..., ...}``), or None for a run starting afresh."""
        resume = self.run.get("resume")
        return None if resume is None else resume["position"]

    # -- the records methods add -------------------------------------------------------------------------
    def rounds(self) -> list[Round]:
        """The stage-1 rounds recorded so far (after a resume: those of the file)."""
        return [Round.from_dict(r, f"rounds[{i}]") for i, r in enumerate(self.run.get("rounds") or [])]

    def add_round(self, rec: Round) -> None:
        self.run["rounds"].append(rec.to_dict())

    def refinement(self) -> Refinement | None:
        ref = self.run.get("refinement")
        return None if ref is None else Refinement.from_dict(ref, "refinement")

    def set_refinement(self, rec: Refinement) -> None:
        self.run["refinement"] = rec.to_dict()

    def set_stage3(self, rec: Stage3) -> None:
        self.run["stage3"] = rec.to_dict()

    def references_done(self) -> list[str]:
        """Names of the references recorded so far."""
        return sorted(self.run.get("references") or {})

    def add_reference(self, rec: Reference) -> None:
        self.run.setdefault("references", {})[rec.name] = rec.to_dict()

    def set_aggressive(self, rec: Aggressive) -> None:
        self.run["aggressive"] = rec.to_dict()

    def set_extra(self, key: str, value: dict) -> None:
        """A method's own top-level record (e.g. the teacher-guided VAE's ``teacher``), kept as-is: plain
        values and tensors only (the run file's rule)."""
        if key in ("format", "version", "status", "config", "eval", "clusterings", "rounds", "refinement", "stage3",
                   "history", "snapshots", "snapshot_order", "outputs", "references", "aggressive", "resume"):
            raise ValueError(f"{key!r} is a part of the run file's schema, not a method's own record")
        self.run[key] = value

    def history_series(self, key: str) -> list:
        """The history series ``key`` being recorded (a list training appends to), created on first use with
        NaN for the rows recorded before it (e.g. the init row of a series measured per epoch)."""
        h = self.run["history"]
        if key not in h:
            h[key] = [math.nan] * len(h["step"])
        return h[key]

    def record(self, model, stage: str, state: dict, terms: torch.Tensor | None) -> dict:
        """Evaluate the model and append one history row (training terms, KL, AU, every l_C); returns the
        evaluation (:meth:`hcdiag.train.loop.Loop.evaluate`)."""
        ev = self.loop.evaluate(model)
        h = self.run["history"]
        h["step"].append(state["step"])
        h["epoch"].append(state["epoch"])
        h["stage"].append(STAGE_CODES[stage])
        t = terms.tolist() if terms is not None else [float("nan")] * 4
        for key, v in zip(("loss", "recon", "kl_train", "cluster"), t):
            h[key].append(v)
        h["kl"].append(ev["kl"])
        h["au"].append(ev["au"])
        h["losses"].append(ev["losses"])
        loss = f"loss {t[0]:.4g} " if terms is not None else ""  # the row before training has no loss
        self.progress.update(f"{stage} epoch {state['epoch']} {loss}KL {ev['kl']:.3f} AU {ev['au']}")
        return ev

    def save(self, model, opt, state: dict, position: dict, complete: bool = False) -> None:
        """Write the run with what ``--resume`` needs to continue from ``position`` bitwise: the model, the
        optimizer's state, the stream state and the number of history rows."""
        run = self.run
        run["status"] = {"complete": complete, "stage": position.get("stage", "done"), "error": None}
        if self.timings is not None:  # so that a resumed run adds to them (Trainer._run)
            run["timings"] = {k: float(v) for k, v in self.timings.items()}
        if complete:
            run.pop("resume", None)
        else:
            run["resume"] = {
                "position": dict(position), "model": cpu_state(model.state_dict()),
                "optimizer": copy.deepcopy(opt.state_dict()) if opt is not None else None,
                "g_idx": state["g_idx"].get_state(), "g_noise": state["g_noise"].get_state().cpu(),
                "perm": state["perm"].clone() if state["perm"] is not None else None, "pos": state["pos"],
                "step": state["step"], "epoch": state["epoch"],
                # rows recorded after this save (up to a non-finite stop) are dropped on --resume
                "history_rows": len(run["history"]["step"]),
            }
        self.write()

    def restore(self, model, opt, seed: int) -> dict:
        """The model, optimizer and stream state of the last save (its generators re-created from ``seed``
        and set to the saved states)."""
        r = self.run["resume"]
        model.load_state_dict(r["model"])
        if opt is not None and r["optimizer"] is not None:
            opt.load_state_dict(r["optimizer"])
        state = self.loop.new_state(seed)
        state["g_idx"].set_state(r["g_idx"])
        state["g_noise"].set_state(r["g_noise"].to(state["g_noise"].get_state().device))
        state.update(perm=r["perm"], pos=int(r["pos"]), step=int(r["step"]), epoch=int(r["epoch"]))
        return state

    def write(self) -> None:
        """Write the run file (atomically); a failed write (a full disk) stops training with one line."""
        if self.out is None:
            return
        from hcdiag.runfile import save_run

        run = self.run
        try:
            save_run(finalize_history(run), self.out)
        except InputError as exc:
            status = run.get("status") or {}
            what = ("Training finished but was not saved" if status.get("complete")
                    else f"Training stopped before stage {status.get('stage')!r}")
            then = (f"{flag('run the same command with --resume', 'run it again with resume=True')} to continue "
                    "from the last save" if self.has_save
                    else "run the same command again (nothing of this run was saved yet)")
            raise InputError(f"{marked(exc)} {what}; once there is room, {then}.") from None
        self.has_save = True


def no_stream() -> dict:
    """The stream state of a save that continues nothing (the references' saves)."""
    return {"g_idx": torch.Generator(), "g_noise": torch.Generator(), "perm": None, "pos": 0, "step": 0,
            "epoch": 0}


__all__ = ["HISTORY_KEYS", "RunWriter", "STAGE_CODES", "cpu_state", "finalize_history", "history_lists",
           "no_stream", "saved_rows", "snapshot_marks"]
