"""Runs that the loss convention does not change, trained once: a baseline under ``literal`` and under
``scaled`` is one training.

The two conventions weight the reconstruction term alike, ``1 / (2 s2)``, and differ only in the clustering
term's weight (:meth:`hcdiag.losses.LossWeights.for_convention`: 1 against ``1 / (2 s2)``). A method without a
clustering term (every method but Historical Consensus's pipeline: the VAE baselines, the aggressive and EM-type
baselines, the teacher-guided VAE, whose alignment term is weighted by ``teacher_alpha``) therefore minimises
the same objective, draws the same batches and noise, and writes the same run file under both, tensor by
tensor, but for the convention it names (``config.loss``, ``config.train.loss`` and the settings' fingerprint).
``mean`` weights the reconstruction ``1 / (2 s2 N)``: another objective, never shared.

:func:`relabel` writes the run of one convention from a complete run of the other, after checking that the
run it copies was written with every other setting, the data, the model, s2, the device and the library
versions this run would have; otherwise it returns None and the run is trained. The tests hold the relabelled
file to one trained from scratch, tensor by tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

CONVENTIONS = ("literal", "scaled")
# where a config names its convention (compared after dropping them): config.loss, config.train.loss, and the
# settings' hash in config.fingerprint (a hash of config.train); and config.resume_format
_LOSS_KEYS = (("loss",), ("train", "loss"), ("fingerprint", "settings"),
              ("resume_format",))  # how a run saves its checkpoints: not what it trains


def shareable(method: str, loss: str) -> bool:
    """Whether a run of ``method`` under ``loss`` is the same training under the other of :data:`CONVENTIONS`."""
    from hcdiag.train.methods import get_method

    return loss in CONVENTIONS and not get_method(method).pipeline


def twin_loss(loss: str) -> str:
    """The other convention of :data:`CONVENTIONS`."""
    return CONVENTIONS[1 - CONVENTIONS.index(loss)]


def _without_loss(config: dict) -> dict:
    import copy

    c = copy.deepcopy(config)
    for path in _LOSS_KEYS:
        d = c
        for k in path[:-1]:
            d = d.get(k) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(path[-1], None)
    return c


def relabel(trainer, twin: str | os.PathLike, out: str | os.PathLike) -> dict | None:
    """Write ``out``, the run ``trainer`` (a :class:`hcdiag.train.Trainer` of a :func:`shareable` method and
    convention) would train, from ``twin``, the complete run of the same settings under the other convention;
    returns the run, or None (nothing written) when ``twin`` is missing, partial, unreadable or differs from
    this run in anything but the convention, or when ``out`` exists (a run begun there is the trainer's to
    resume or refuse). ``out`` is locked while it is written, as the trainer locks it. The run keeps ``twin``'s
    timings: they are the time its one training took."""
    from hcdiag.atomic import OutputBusy, OutputLock

    c = trainer.cfg
    if not shareable(c.method, c.loss) or not Path(twin).is_file() or Path(out).exists():
        return None
    lock = OutputLock(Path(out), owner="train")
    try:
        lock.acquire()
    except (OutputBusy, OSError):
        return None  # another writer has it: the trainer will say so
    try:
        if Path(out).exists():
            return None
        return _relabel(trainer, twin, out)
    finally:
        lock.release()


def _relabel(trainer, twin, out) -> dict | None:
    from hcdiag.errors import InputError
    from hcdiag.runfile import load_run, save_run

    c = trainer.cfg
    try:
        prev = load_run(twin)
    except InputError:
        return None
    data = prev.data
    if not prev.complete or (data.get("config") or {}).get("loss") != twin_loss(c.loss):
        return None
    if trainer.loop is None:
        trainer.setup()
    mine = trainer.config_dict()
    if _without_loss(data["config"]) != _without_loss(mine):
        return None
    run = dict(data)
    run["config"] = mine
    save_run(run, out)
    return run


__all__ = ["CONVENTIONS", "relabel", "shareable", "twin_loss"]
