"""The run file: the public contract between a training run and the checks.

A run file (conventionally ``run.pt``) records one training run so that every check in
``claims.md`` can be recomputed later without the dataset and without trusting the producer's
code. hcdiag's trainer writes it with :func:`save_run`; the checks read it with :func:`load_run`;
anyone else's trainer may write it too. The schema (version 1) is documented in
``docs/runfile.md`` and enforced by :func:`validate_run`.

Safety: a run file holds only tensors, dicts, lists, tuples, str, int, float, bool and None, so
it loads with ``torch.load(weights_only=True)``; nothing else is ever unpickled, and no code
from a file runs. Writing is atomic (temporary file in the same folder, fsync, ``os.replace``).

This module never imports the trainer or the checks. It imports :mod:`hcdiag.models` (upstream of the run
file) lazily, and only to learn the parameter names and shapes a ``config.model`` gives (validation, on
PyTorch's meta device: nothing is allocated) and to compute the outputs of :func:`example_run`'s snapshots.

>>> import tempfile, os
>>> run = example_run(R0=4, K=3, N=5, m=20, n=2)
>>> path = save_run(run, os.path.join(tempfile.mkdtemp(), "run.pt"))
>>> r = load_run(path)
>>> (r.r0, r.k, r.N, r.m, r.latent_dim), r.snapshot_names[0], r.complete
((4, 3, 5, 20, 2), 'init', True)
"""

from __future__ import annotations

import math
import os
import re
import reprlib
import stat
import warnings
from pathlib import Path
from typing import Any

import torch

from hcdiag.errors import InputError, flag, marked
from hcdiag.paper import METHODS as PAPER_METHODS
from hcdiag.records import (HISTORY_SERIES, MODEL_FAMILIES, REFERENCE_NAMES, RESP_ROW_TOL, Aggressive,  # noqa: F401
                            Clusterings, Dims, EvalSet, History, Outputs, Reference, References, Refinement, Round,
                            RunConfig, Stage3, Status, Teacher, bool_at, dict_at, float_at, int_at, kind, model_fields, need,
                            state_dict_at, str_at, tensor_at)

FORMAT = "hcdiag-run"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

METHODS = PAPER_METHODS  # hcdiag's trainer's methods; a producer may name its own (config.method)

_ALLOWED = "tensors, dicts, lists, tuples, str, int, float, bool and None"
_DOCS = "see docs/runfile.md"
_PARTIAL_HINT = (f"load it with partial=True{flag(' (on the command line: hcdiag check-barrier --partial)', '')} to "
                 "check a run still training")
_MAX_MEMORY = flag("--max-memory", "max_memory")  # load_run's memory bound, the command line's --max-memory
# Levels of dicts, lists and tuples a run file may nest. The schema needs 5 (references.<r>.snapshots.<name>.<key>);
# a file nesting deeper is not a run file, and walking it must not end in a RecursionError.
MAX_DEPTH = 64
# Rows of eval.x the checks push through a model at a time (RunContext's batch size, encode_decode's default).
EVAL_BATCH_ROWS = 4096
# What checking a run takes besides the file's own tensors (docs/runfile.md, "Memory bound"), in bytes:
PARAM_BYTES = 40  # per parameter of a rebuilt model: float32 model + 2 float32 working states + 3 float64 vectors
ALIGN_BYTES = 16  # per entry of weight matching's k x k similarity matrix (float32, its float64 copy, the assignment)


# --------------------------------------------------------------------------------------------
# validation


_kind = kind


def _short(where: str, limit: int = 80) -> str:
    return where if len(where) <= limit else where[:limit] + "..."


class _Repr(reprlib.Repr):
    """``repr`` cut short in length and depth (a key may be a tuple nested thousands deep); tensors by shape."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, 80, 80

    def repr_Tensor(self, x, level):  # noqa: N802 (reprlib dispatches on the type's name)
        return f"tensor of shape {tuple(x.shape)}"


def _shown(value: Any) -> str:
    """A value read from a file, for a message: short, whatever its size or depth."""
    if value is None or type(value) in (str, bool, int, float, tuple) or isinstance(value, torch.Tensor):
        return _Repr().repr(value)
    return f"a {_kind(value)}"


def _tensor_bytes(t: torch.Tensor, where: str) -> tuple[int, int]:
    """``(storage id, storage bytes)`` of a tensor read from a file, refusing tensors whose size is a claim
    not backed by data: sparse, meta or quantized tensors, and strided ones that claim more elements than
    their storage holds (``torch.empty(1).expand(10**12)`` is 4 bytes in the file and 4 TB to anything that
    touches it). Reads only the tensor's metadata: nothing is allocated."""
    kind = ("sparse" if t.layout != torch.strided else "meta" if t.device.type == "meta" else
            f"{t.device.type}" if t.device.type != "cpu" else "quantized" if t.is_quantized else None)
    if kind is not None:
        raise InputError(f"{where} is a {kind} tensor of shape {tuple(t.shape)}; a run file holds dense CPU "
                         "tensors with their values: store it as one (t.to_dense().cpu(), or "
                         "hcdiag.runfile.save_run, which does this).")
    storage = t.untyped_storage()
    held = storage.nbytes() // max(1, t.element_size())
    if t.numel() > held:
        raise InputError(f"{where} claims {t.numel()} elements but its storage holds {held}; a run file's tensors "
                         "hold every value they claim (torch.save of an expand() or as_strided view stores one "
                         "copy of the repeated values): store a compact copy (t.contiguous().clone(); "
                         "hcdiag.runfile.save_run does this).")
    return storage.data_ptr(), storage.nbytes()


_PLAIN_SCALARS = (str, bool, int, float)


def _check_plain(obj: Any, where: str) -> int:
    """Refuse anything ``torch.load(weights_only=True)`` would not load back (first offender, depth first),
    nesting deeper than :data:`MAX_DEPTH` levels and tensors that claim more than they hold
    (:func:`_tensor_bytes`). Returns the bytes of the distinct tensor storages: what the run occupies in
    memory. Iterative, so no input ends in a RecursionError."""
    storages: dict[int, int] = {}
    stack: list[tuple[Any, str, int]] = [(obj, where, 0)]
    while stack:
        obj, where, depth = stack.pop()
        if isinstance(obj, torch.Tensor):
            ptr, nbytes = _tensor_bytes(obj, where)
            storages[ptr] = max(nbytes, storages.get(ptr, 0))
            continue
        if obj is None or type(obj) in _PLAIN_SCALARS:
            continue
        if isinstance(obj, (dict, list, tuple)):
            if depth >= MAX_DEPTH:
                raise InputError(f"{_short(where)} nests deeper than {MAX_DEPTH} levels of dicts, lists and tuples; a "
                                 "run file nests a few (references.<r>.snapshots.<name>.<key> is the deepest): this "
                                 f"is not a run file hcdiag reads; write the run with hcdiag.runfile.save_run, {_DOCS}.")
            if isinstance(obj, dict):
                for key in obj:
                    if not isinstance(key, (str, int)) or isinstance(key, bool):
                        raise InputError(f"{where or 'the run'} has a key of type {_kind(key)} ({_shown(key)}); "
                                         "dict keys in a run file must be str or int.")
                items = obj.items()
                name = (lambda k: f"{where}.{k}") if where else str
            else:
                items = enumerate(obj)
                name = lambda i: f"{where}[{i}]"  # noqa: E731
            # scalars are checked here, without a path string each: a list of a million ints stays cheap
            children = [(v, name(k), depth + 1) for k, v in items if not (v is None or type(v) in _PLAIN_SCALARS)]
            stack.extend(reversed(children))
            continue
        raise InputError(f"{where or 'the run'} is a {_kind(obj)}; convert it to a tensor or a plain "
                         f"Python value (a run file holds only {_ALLOWED}, so it loads with weights_only=True).")
    return sum(storages.values())


class _Validator:
    """One pass over a run dict; raises :class:`InputError` (one line) on the first problem. The parts are
    read into their records (:mod:`hcdiag.records`, which check their own fields and the dimensions they share
    through ``self.dims``); what ties parts together is checked here. ``self.parts`` holds the records."""

    def __init__(self, run: dict, partial: bool, max_memory: int | None = None):
        self.run = run
        self.partial = partial
        self.max_memory = max_memory
        self.dims = Dims()  # dim name -> (value, key it came from): N, R0, K, m, n, h
        self.parts: dict[str, Any] = {}  # part name -> its record (config, eval, clusterings, rounds, ...)
        self._expected: dict[str, dict] = {}  # config.model (repr) -> {parameter name: shape}
        self._meta: dict[str, Any] = {}  # config.model (repr) -> its model on the meta device
        self._rebuilt: dict[str, tuple[dict, str]] = {}  # config.model (repr) -> (it, where) for models with states
        self.stored_bytes = 0  # the distinct tensor storages of the run

    # ---- helpers -------------------------------------------------------------------------
    need = staticmethod(need)
    dict_at = staticmethod(dict_at)
    int_at = staticmethod(int_at)
    str_at = staticmethod(str_at)
    bool_at = staticmethod(bool_at)
    float_at = staticmethod(float_at)

    def agree(self, dim: str, value: int, where: str) -> None:
        """Every occurrence of a dimension (N, R0, K, m, n, h) must agree with the first one seen."""
        self.dims.agree(dim, value, where)

    def snapshot_exists(self, name: Any, where: str) -> None:
        str_at(name, where)
        if name not in self.snapshot_names:
            raise InputError(f"{where} names snapshot {name!r}, which is neither in snapshots nor in outputs; "
                             "write that snapshot or fix the name.")

    # ---- the schema ----------------------------------------------------------------------
    def validate(self) -> dict[str, Any]:
        run = self.run
        if not isinstance(run, dict):
            raise InputError(f"the run must be a dict with format={FORMAT!r}; got {_kind(run)}.")
        if "format" not in run:
            raise InputError(f"has no 'format' key, so it is not an hcdiag run file (a bare state_dict or "
                             f"checkpoint?); write it with hcdiag.runfile.save_run, {_DOCS}.")
        # before anything reads a value: plain types only, bounded nesting, tensors that hold what they claim
        self.stored_bytes = _check_plain(run, "")
        if not (type(run["format"]) is str and run["format"] == FORMAT):
            raise InputError(f"format is {_shown(run['format'])}, not {FORMAT!r}, so it is not an hcdiag run file; {_DOCS}.")
        version = self.need(run, "version", "")
        if not isinstance(version, int) or isinstance(version, bool):
            raise InputError(f"version must be an int; got {_shown(version)} ({_kind(version)}).")
        if version not in SUPPORTED_VERSIONS:
            raise InputError(f"version {version} is not supported; this hcdiag reads version(s) "
                             f"{', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade hcdiag or write the run as version {VERSION}.")
        self.status()
        self.config()
        self.eval()
        self.clusterings()
        self.snapshots_and_outputs()
        self.rounds()
        self.refinement()
        self.stage3()
        self.history()
        self.aggressive()
        self.teacher()
        self.references()
        if self.max_memory is not None:
            self.memory(self.max_memory)
        return self.parts

    def status(self) -> None:
        status = self.run.get("status")
        if status is None:
            self.parts["status"] = Status()
            return
        st = self.parts["status"] = Status.from_dict(status)
        if not st.complete and not self.partial:
            lines = [ln.strip() for ln in (st.error or "").splitlines() if ln.strip()]
            # a recorded traceback ends with the exception itself: that is the line worth showing
            shown = (lines[-1] if lines[0].startswith("Traceback") else lines[0]) if lines else ""
            why = f" with the error: {shown[:200]}" if shown else ""
            raise InputError(f"status says the run is not complete (it stopped at stage {st.stage!r}{why}); "
                             f"wait for training to finish, or {_PARTIAL_HINT}.")

    def config(self) -> None:
        self.parts["config"] = RunConfig.from_dict(self.need(self.run, "config", ""))

    def model_dict(self, model: Any, where: str) -> dict:
        """A ``config.model`` dict (the run's or a reference's): its fields (:func:`hcdiag.records.model_fields`)."""
        return model_fields(model, where)

    @staticmethod
    def _model_key(model: dict) -> str:
        return repr(sorted(repr(item) for item in model.items()))  # repr first: keys may mix str and int

    def meta_model(self, model: dict, where: str) -> torch.nn.Module:
        """The model ``model`` (a validated ``config.model`` at ``where``) describes, built once per config on
        PyTorch's meta device: shapes only, no parameter memory is allocated whatever its widths."""
        key = self._model_key(model)
        if key not in self._meta:
            from hcdiag.models import MODEL_FAMILIES as CLASSES
            from hcdiag.models import ModelConfig

            try:
                cfg = ModelConfig.from_dict(model)
                with torch.device("meta"):
                    self._meta[key] = CLASSES[cfg.family](cfg)
            except InputError as exc:
                raise InputError(f"{where} cannot be built: {marked(exc).rstrip('.')}; fix {where}, {_DOCS}.") from None
            except Exception as exc:  # noqa: BLE001 (a config the constructors cannot use: one line, no traceback)
                raise InputError(f"{where} cannot be built ({type(exc).__name__}: {marked(exc)}); fix {where}, "
                                 f"{_DOCS}.") from None
        return self._meta[key]

    def expected_state(self, model: dict, where: str) -> dict[str, tuple[int, ...]]:
        """``{parameter name: shape}`` of the model ``model`` (a validated ``config.model`` at ``where``)."""
        key = self._model_key(model)
        if key not in self._expected:
            net = self.meta_model(model, where)
            self._expected[key] = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        return self._expected[key]

    def state_fits(self, state: dict, where: str, model: dict, model_where: str) -> None:
        """A state_dict at ``where`` must be exactly that of the model ``model`` (at ``model_where``) describes:
        the same parameter names, the same shapes, floating and finite values."""
        family = model.get("family")
        layers = len(model.get("enc_widths") or ()) + len(model.get("dec_widths") or ()) if family == "mlp" else 0
        if 2 * layers > len(state):  # before building it: a million listed widths would take minutes and gigabytes
            raise InputError(f"{where} holds {len(state)} tensors but {model_where} lists {layers} hidden layers of 2 "
                             f"tensors each (weight, bias); {model_where} must describe the model that was trained "
                             "(widths, latent_dim, input_dim, channels).")
        want = self.expected_state(model, model_where)
        self._rebuilt.setdefault(self._model_key(model), (model, model_where))  # the checks will evaluate it
        for key in state:
            if key not in want:
                raise InputError(f"{where} has unexpected key {key!r} for {model_where} (family {family!r}); store "
                                 f"exactly the state_dict of the model {model_where} describes (its parameter names "
                                 "and shapes are listed in docs/runfile.md, 'Parameter names').")
        for key, shape in want.items():
            if key not in state:
                raise InputError(f"{where} lacks key {key!r}, which the model of {model_where} (family {family!r}) "
                                 "has; store its full state_dict (parameter names and shapes: docs/runfile.md, "
                                 "'Parameter names').")
            t = state[key]
            if tuple(t.shape) != shape:
                raise InputError(f"{where}.{key} has shape {tuple(t.shape)} but the model of {model_where} "
                                 f"(family {family!r}) has {shape}; {model_where} must describe the model that was "
                                 "trained (widths, latent_dim, input_dim, channels).")
            tensor_at(t, f"{where}.{key}", t.ndim, finite=True)

    def eval(self) -> None:
        self.parts["eval"] = EvalSet.from_dict(self.need(self.run, "eval", ""), dims=self.dims)
        cfg: RunConfig = self.parts["config"]
        dataset = cfg.dataset or {}
        if isinstance(dataset.get("N"), int):
            self.agree("N", dataset["N"], "config.dataset.N")
        for where, shape in (("config.dataset.image_shape", dataset.get("image_shape")),
                             ("config.model.image_shape", (cfg.model or {}).get("image_shape"))):
            if shape is not None:
                self.agree("N", math.prod(shape), where)
        if cfg.model is not None:
            self.agree("N", cfg.model["input_dim"], "config.model.input_dim")
            self.agree("n", cfg.model["latent_dim"], "config.model.latent_dim")

    def clusterings(self) -> None:
        self.parts["clusterings"] = Clusterings.from_dict(self.need(self.run, "clusterings", ""), dims=self.dims)
        hct = self.parts["config"].hct
        if hct is not None and hct.get("r0") is not None:
            self.agree("R0", hct["r0"], "config.hct.r0")

    def snapshots_and_outputs(self) -> None:
        run = self.run
        cfg: RunConfig = self.parts["config"]
        snaps = run.get("snapshots")
        outs = run.get("outputs")
        if snaps is None and outs is None:
            raise InputError("snapshots and outputs are both missing; a run file needs model parameters "
                             "(snapshots with config.model) or per-snapshot outputs; " + _DOCS + ".")
        names: list[str] = []
        if snaps is not None:
            self.dict_at(snaps, "snapshots")
            for name, state in snaps.items():
                str_at(name, "a snapshots key")
                state_dict_at(state, f"snapshots.{name}")
                names.append(name)
            if snaps and cfg.model is None and not outs:
                raise InputError("snapshots are given but config.model is missing, so hcdiag cannot rebuild the model; "
                                 "add config.model or store outputs per snapshot.")
            if cfg.model is not None:
                for name, state in snaps.items():
                    self.state_fits(state, f"snapshots.{name}", cfg.model, "config.model")
        outputs: dict[str, Outputs] = {}
        if outs is not None:
            self.dict_at(outs, "outputs")
            for name, out in outs.items():
                str_at(name, "an outputs key")
                outputs[name] = Outputs.from_dict(out, f"outputs.{name}", self.dims)
                if name not in names:
                    names.append(name)
        self.parts["outputs"] = outputs
        self.snapshot_names = names
        order = run.get("snapshot_order")
        if order is not None:
            if not isinstance(order, (list, tuple)):
                raise InputError(f"snapshot_order must be a list of snapshot names; got {_kind(order)}.")
            for i, name in enumerate(order):
                self.snapshot_exists(name, f"snapshot_order[{i}]")
            if len(set(order)) != len(order):
                raise InputError("snapshot_order repeats a name; each snapshot appears once, in training order.")
            missing = [n for n in names if n not in order]
            if missing:
                raise InputError(f"snapshot_order lacks {missing[:5]}, which are in snapshots/outputs; "
                                 "list every snapshot once, in training order.")
            self.snapshot_names = list(order)
        if not names and not self.partial:
            raise InputError(f"snapshots and outputs are both empty; a complete run needs at least one snapshot; {_PARTIAL_HINT}.")

    def _absent(self, key: str, what: str) -> bool:
        """True when ``key`` is None/absent; refuses that for a complete HCT run."""
        if self.run.get(key) is not None:
            return False
        if self.parts["config"].is_hct and not self.partial:
            raise InputError(f"{key} is missing; a complete hct run records {what}; {_PARTIAL_HINT}.")
        return True

    def rounds(self) -> None:
        self.parts["rounds"] = None
        if self._absent("rounds", "one entry per stage-1 round"):
            return
        rounds = self.run["rounds"]
        if not isinstance(rounds, (list, tuple)):
            raise InputError(f"rounds must be a list of dicts; got {_kind(rounds)}.")
        r0 = self.dims.get("R0")
        if not rounds and self.parts["config"].is_hct and not self.partial and r0 > 2:  # R0 = 2 has no round to run
            raise InputError(f"rounds is empty; a complete hct run with R0={r0} records one entry per stage-1 "
                             f"round; {_PARTIAL_HINT}.")
        records: list[Round] = []
        for i, entry in enumerate(rounds):
            where = f"rounds[{i}]"
            rec = Round.from_dict(entry, where, self.dims)
            if records and rec.round <= records[-1].round:
                raise InputError(f"{where}.round is {rec.round} after round {records[-1].round}; rounds must be in "
                                 "training order.")
            self.snapshot_exists(rec.snapshot, f"{where}.snapshot")
            records.append(rec)
        self.parts["rounds"] = tuple(records)

    def refinement(self) -> None:
        self.parts["refinement"] = None
        if self._absent("refinement", "the stage-2 refinement"):
            return
        ref = self.parts["refinement"] = Refinement.from_dict(self.run["refinement"], "refinement", self.dims)
        hct = self.parts["config"].hct
        if hct is not None and hct.get("eps") is not None:
            said = self.float_at(hct["eps"], "config.hct.eps", positive=True)
            if not math.isclose(said, ref.eps, rel_tol=1e-9):
                raise InputError(f"refinement.eps is {ref.eps:g} but config.hct.eps is {said:g}; the refinement's "
                                 "target is one number: write the eps the refinement trained towards in both.")
        self.snapshot_exists(ref.snapshot, "refinement.snapshot")

    def stage3(self) -> None:
        self.parts["stage3"] = None
        if self._absent("stage3", "the stage-3 stress test"):
            return
        s3 = self.parts["stage3"] = Stage3.from_dict(self.run["stage3"], "stage3", self.dims)
        for i, name in enumerate(s3.snapshots):
            self.snapshot_exists(name, f"stage3.snapshots[{i}]")

    def history(self) -> None:
        hist = self.run.get("history")
        self.parts["history"] = None if hist is None else History.from_dict(hist, "history", self.dims)

    def aggressive(self) -> None:
        """The aggressive baseline's record (He et al. 2019): MI per aggressive epoch, the epoch it ended."""
        agg = self.run.get("aggressive")
        self.parts["aggressive"] = None if agg is None else Aggressive.from_dict(agg)

    def teacher(self) -> None:
        """The teacher-guided VAE's record: its head must fit the run's K and latent dimension."""
        rec = self.run.get("teacher")
        self.parts["teacher"] = None if rec is None else Teacher.from_dict(rec, "teacher", self.dims)

    def references(self) -> None:
        refs = self.run.get("references")
        self.parts["references"] = None
        if refs is None:
            return
        self.dict_at(refs, "references")
        run_model = self.parts["config"].model
        records = {}
        for name in REFERENCE_NAMES:
            if refs.get(name) is None:
                continue
            where = f"references.{name}"
            rec = records[name] = Reference.from_dict(name, refs[name], where, self.dims)
            # its own config.model, else the run's (a reference of the run's architecture need not repeat it)
            model, model_where = rec.model, f"{where}.config.model"
            if model is not None:
                self.agree("N", model["input_dim"], f"{model_where}.input_dim")
            else:
                model, model_where = run_model, "config.model"
            if rec.state is not None:
                if model is None:
                    alt = f", or store {where}.outputs instead" if name == "collapsed" else ""
                    raise InputError(f"{where}.state is given but neither {where}.config.model nor config.model says "
                                     f"how to rebuild it; add {where}.config.model{alt}.")
                self.state_fits(rec.state, f"{where}.state", model, model_where)
            if rec.outputs is not None and model is not None and rec.state is not None:
                self.agree(f"n of {where}", int(model["latent_dim"]), f"{model_where}.latent_dim")
            if rec.snapshots is not None:  # the vanilla reference's training trajectory (I3's baseline distance)
                if rec.snapshots and model is None:
                    raise InputError(f"{where}.snapshots are given but neither {where}.config.model nor config.model "
                                     f"says how to rebuild them; add {where}.config.model.")
                for sname, sd in rec.snapshots.items():
                    self.state_fits(sd, f"{where}.snapshots.{sname}", model, model_where)
        self.parts["references"] = References(**records, extra={k: v for k, v in refs.items()
                                                                if k not in REFERENCE_NAMES})

    # ---- the memory bound ------------------------------------------------------------------
    def activations_per_row(self, model: dict, where: str) -> int:
        """Numbers one eval row produces in a forward pass (``encode``, then ``decode`` of the mean) of the
        model ``model`` describes: the input and every layer's output. Counted from the layers when every
        layer with parameters is a Linear (its output is ``out_features`` wide, a parameter-free layer's as
        wide as the one before it), else by a forward pass on the meta device (a conv net's sizes depend on
        its image shape; the first meta pass costs about 1 s of imports). Nothing is allocated."""
        net = self.meta_model(model, where)
        leaves = [mod for mod in net.modules() if next(mod.children(), None) is None]
        if all(isinstance(mod, torch.nn.Linear) or not any(True for _ in mod.parameters(recurse=False))
               for mod in leaves):
            counts, width = [], 0
            for mod in leaves:
                width = mod.out_features if isinstance(mod, torch.nn.Linear) else width
                counts.append(width)
            return int(model["input_dim"]) + sum(counts)
        counts = []
        hooks = [mod.register_forward_hook(lambda _m, _i, out: counts.append(out.numel())) for mod in leaves]
        try:
            with torch.no_grad():
                mu, _ = net.encode(torch.zeros(1, int(model["input_dim"]), device="meta"))
                net.decode(mu)
        except Exception as exc:  # noqa: BLE001 (a model that cannot run cannot be checked: one line)
            raise InputError(f"{where} cannot be evaluated ({_first_line(exc)}); fix {where}, {_DOCS}.") from None
        finally:
            for h in hooks:
                h.remove()
        return int(model["input_dim"]) + sum(counts)

    def memory_parts(self) -> list[tuple[int, str]]:
        """``(bytes, what)`` of everything checking this run holds at once, by the estimate of docs/runfile.md
        ("Memory bound"): the file's tensors, then per model the checks rebuild its parameters, its
        activations on a batch of eval rows and weight matching's similarity matrix, then the cached
        outputs of every snapshot and reference and eq. 8's distances. Sizes come from the validated
        shapes and the models on the meta device: nothing is allocated."""
        from hcdiag.alignment import permutation_spec

        m, N = self.dims.get("m"), self.dims.get("N")
        R0, K = self.dims.get("R0"), self.dims.get("K")
        n = self.dims.get("n") or 0
        rows = min(m, EVAL_BATCH_ROWS)
        parts = [(self.stored_bytes, "the file's tensors")]
        for model, where in self._rebuilt.values():
            n_params = sum(math.prod(shape) for shape in self.expected_state(model, where).values())
            parts.append((PARAM_BYTES * n_params, f"{where}: the parameters of its model ({n_params} of them)"))
            act = self.activations_per_row(model, where)
            parts.append((4 * rows * act, f"{where}: its model's activations on {rows} eval rows at a time "
                                          f"({act} numbers per row)"))
            collapsed = (self.run.get("references") or {}).get("collapsed") or {}
            if where == "config.model" and collapsed.get("state") is not None:  # I3 aligns every snapshot onto it
                k = max(permutation_spec(model).sizes.values(), default=0)
                snaps = len(self.run.get("snapshots") or {})
                parts.append((ALIGN_BYTES * k * k + 4 * n_params * snaps, f"{where}: I3's weight matching (a {k} x {k} "
                                                                          f"similarity matrix, {snaps} aligned snapshots)"))
        models = len(self.snapshot_names) + len(self.run.get("references") or {})
        parts.append((4 * models * m * (N + 2 * n), f"the outputs (mu, logvar, xhat) of {models} snapshots and "
                                                    f"references on eval.x ({m} rows)"))
        parts.append((16 * R0 * m * K + 12 * m * N, f"eq. 8's distances of {m} eval rows to {R0} x {K} centroids"))
        return parts

    def memory(self, limit: int) -> None:
        """Refuse (one line) a run whose check would need more than ``limit`` bytes, naming the largest part."""
        parts = self.memory_parts()
        total = sum(b for b, _ in parts)
        if total <= limit:
            return
        big, what = max(parts)
        raise InputError(f"checking this run needs about {format_bytes(total)}, more than the memory bound "
                         f"({_MAX_MEMORY}) of {format_bytes(limit)}; the largest part is {what}: "
                         f"{format_bytes(big)}. Raise {_MAX_MEMORY} if this machine has the memory (e.g. "
                         f"{_size_arg(total)}); if those sizes are wrong, fix the producer, {_DOCS}.")


def validate_run(run: dict, *, partial: bool = False, max_memory: int | None = None) -> None:
    """Check ``run`` against the schema (version 1, ``docs/runfile.md``).

    Raises :class:`InputError` with a one-line message naming the first problem (the key with its
    full path, e.g. ``clusterings.centroids``; both keys when shapes disagree; the count of
    non-finite values). ``partial=True`` accepts a run still training: rounds, refinement, stage3
    and snapshots may be absent or incomplete, and ``status.complete`` may be False.

    >>> validate_run(example_run())
    >>> bad = example_run(); del bad["clusterings"]["centroids"]
    >>> validate_run(bad)
    Traceback (most recent call last):
    ...
    hcdiag.errors.InputError: clusterings.centroids is missing; a run file needs it ([R0, K, N]); see docs/runfile.md.

    ``max_memory`` (bytes) also refuses a run whose check would need more memory than that (docs/runfile.md,
    "Memory bound"); None sets no such bound (the nesting and every tensor's claim are bounded anyway).
    """
    _Validator(run, partial, max_memory).validate()


def is_complete(run: dict) -> bool:
    """True iff ``run`` is a valid COMPLETE run (status complete, all stages recorded)."""
    try:
        validate_run(run, partial=False)
    except InputError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# the memory bound

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: float) -> str:
    """``1.5 GiB``, ``512 MiB``, ``12 B`` (powers of 1024)."""
    i = 0
    while n >= 1024 and i < len(_UNITS) - 1:
        n /= 1024
        i += 1
    return f"{n:.3g} {_UNITS[i]}" if i else f"{int(n)} B"


def _size_arg(n: int) -> str:
    """A memory bound of at least ``n`` bytes, in whole MiB or GiB, as it is given: ``--max-memory 512M`` on the
    command line, ``max_memory=512 * 2**20`` to :func:`load_run`."""
    count, unit, power = (math.ceil(n / 2**20), "M", 20) if n < 2**30 else (math.ceil(n / 2**30), "G", 30)
    return flag(f"--max-memory {count}{unit}", f"max_memory={count} * 2**{power}")


def machine_memory() -> int | None:
    """Bytes of memory of this machine (``MemTotal``), or of its cgroup when that sets a lower limit; None
    when neither says."""
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform names these
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (total or float("inf")):
            total = int(text)
    return total


def default_max_memory() -> int:
    """The default memory bound of :func:`load_run` (``hcdiag check-barrier --max-memory``): half of
    :func:`machine_memory`, or 4 GiB where the machine does not say, so a file cannot take a shared
    machine's memory by what it claims."""
    total = machine_memory()
    return total // 2 if total else 4 * 2**30


# --------------------------------------------------------------------------------------------
# reading


class Run:
    """A read-only view over a validated run dict: its parts as typed records (:mod:`hcdiag.records`); the dict
    itself is at :attr:`data`.

    Shapes: ``eval_x`` (m, N); ``xbar`` (N,); ``eigenvalues`` (k,) descending;
    ``centroids`` (R0, K, N). ``r0`` is R0 (number of clusterings), ``k`` is K (centroids per
    clustering), ``N`` the data dimension, ``m`` the number of evaluation rows. Tensors are on CPU
    when read with :func:`load_run`. The records share the dict's tensors (nothing is copied).
    """

    __slots__ = ("_path", "_data", "_complete", "_parts", "_names")

    def __init__(self, data: dict, path: str | os.PathLike | None = None, *, partial: bool = False,
                 max_memory: int | None = None):
        v = _Validator(data, partial, max_memory)
        parts = v.validate()
        object.__setattr__(self, "_path", Path(path) if path is not None else None)
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_complete", is_complete(data) if partial else True)
        object.__setattr__(self, "_parts", parts)
        object.__setattr__(self, "_names", list(v.snapshot_names))

    def __setattr__(self, name, value):
        raise AttributeError("Run is read-only; edit .data and build a new Run to change it")

    def __repr__(self) -> str:
        where = f"{str(self._path)!r}, " if self._path is not None else ""
        return (f"Run({where}method={self.method!r}, R0={self.r0}, K={self.k}, N={self.N}, m={self.m}, "
                f"snapshots={len(self.snapshot_names)}, complete={self.complete})")

    # ---- raw parts -----------------------------------------------------------------------
    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def data(self) -> dict:
        """The version-1 dict as read (the records below are views of it)."""
        return self._data

    @property
    def version(self) -> int:
        return self._data["version"]

    @property
    def config(self) -> RunConfig:
        return self._parts["config"]

    @property
    def status(self) -> Status:
        """An absent status reads as complete."""
        return self._parts["status"]

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def s2(self) -> float:
        """Decoder variance (the paper's sigma'^2), in squared data units."""
        return self.config.s2

    @property
    def complete(self) -> bool:
        return self._complete

    # ---- evaluation data and clusterings -------------------------------------------------
    @property
    def eval(self) -> EvalSet:
        return self._parts["eval"]

    @property
    def eval_x(self) -> torch.Tensor:
        """Evaluation subset, shape (m, N)."""
        return self.eval.x

    @property
    def xbar(self) -> torch.Tensor:
        """Full-data mean, shape (N,)."""
        return self.eval.xbar

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Top data-covariance eigenvalues, shape (k,), descending; ``eigenvalues[0]`` is lambda_max."""
        return self.eval.eigenvalues

    @property
    def lambda_max(self) -> float:
        """``config.lambda_max`` when given, else the top stored eigenvalue."""
        value = self.config.lambda_max
        return value if value is not None else self.eval.lambda_max

    @property
    def clusterings(self) -> Clusterings:
        return self._parts["clusterings"]

    @property
    def centroids(self) -> torch.Tensor:
        """Centroids of every clustering, shape (R0, K, N)."""
        return self.clusterings.centroids

    @property
    def r0(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def k(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def N(self) -> int:  # noqa: N802 (the paper's symbol)
        return int(self.eval_x.shape[1])

    @property
    def m(self) -> int:
        return int(self.eval_x.shape[0])

    @property
    def latent_dim(self) -> int | None:
        """Latent dim n, from ``config.model`` or else from the outputs; None when neither says."""
        if self.config.model is not None:
            return int(self.config.model["latent_dim"])
        for out in self._parts["outputs"].values():
            return int(out.mu.shape[1])
        return None

    # ---- snapshots -----------------------------------------------------------------------
    @property
    def snapshot_names(self) -> list[str]:
        """Snapshot names in training order (``snapshot_order``, else snapshots then outputs keys)."""
        return list(self._names)

    @property
    def has_parameters(self) -> bool:
        """True when snapshots hold state_dicts and ``config.model`` says how to rebuild the model."""
        return bool(self._data.get("snapshots")) and self.config.model is not None

    @property
    def has_outputs(self) -> bool:
        return bool(self._parts["outputs"])

    def _where(self) -> str:
        return f"{self._path}: " if self._path is not None else ""

    @property
    def has_snapshot_order(self) -> bool:
        """Whether the file states the training order (``snapshot_order``) rather than leaving it to the keys."""
        return self._data.get("snapshot_order") is not None

    def has_state(self, name: str) -> bool:
        """Whether snapshot ``name`` has parameters (a state_dict) in the file."""
        return name in (self._data.get("snapshots") or {})

    def snapshot(self, name: str) -> dict:
        """The state_dict (str -> tensor) saved under ``name``."""
        snaps = self._data.get("snapshots") or {}
        if name not in snaps:
            have = ", ".join(snaps) or "none"
            raise InputError(f"{self._where()}has no parameters for snapshot {name!r} (snapshots with parameters: "
                             f"{have}); pick one of those, or use outputs({name!r}).")
        return snaps[name]

    def outputs(self, name: str) -> Outputs | None:
        """The stored :class:`~hcdiag.records.Outputs` (mu (m, n), logvar (m, n), xhat (m, N)) of snapshot
        ``name``, or None."""
        return self._parts["outputs"].get(name)

    # ---- training record -----------------------------------------------------------------
    @property
    def rounds(self) -> tuple[Round, ...] | None:
        return self._parts["rounds"]

    @property
    def refinement(self) -> Refinement | None:
        return self._parts["refinement"]

    @property
    def stage3(self) -> Stage3 | None:
        return self._parts["stage3"]

    @property
    def history(self) -> History | None:
        return self._parts["history"]

    @property
    def aggressive(self) -> Aggressive | None:
        return self._parts["aggressive"]

    @property
    def references(self) -> References | None:
        return self._parts["references"]

    @property
    def teacher(self) -> Teacher | None:
        """The teacher-guided VAE's record (``method: teacher``), or None."""
        return self._parts["teacher"]


_GLOBAL_RE = re.compile(r"GLOBAL\s+([\w.<>]+)")


def _unsafe_reason(exc: BaseException) -> str:
    """What the weights_only unpickler refused, parsed from torch's message."""
    text = str(exc)
    found = _GLOBAL_RE.search(text)
    if found:
        return f"it asked for the global {found.group(1)}, which is not allowlisted"
    for marker in ("WeightsUnpickler error:", "Trying to load"):
        if marker in text:
            tail = " ".join(text.split(marker, 1)[1].split())
            return (tail.split(" Check the documentation")[0] or "unsupported pickle content")[:160]
    return "unsupported pickle content"


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = text.split(". ")[0]  # torch appends paragraphs of advice; the first sentence is the fact
    return f"{type(exc).__name__}: {text[:160]}"


_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


_TUPLE_ARITY = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def _check_pickle_nesting(data: Any, where: str) -> None:
    """Refuse a pickle (bytes or a binary file positioned at one) that nests tuples deeper than
    :data:`MAX_DEPTH`, reading its opcodes without building anything. Tuples are what matters: hashing a tuple
    recurses in C with no depth check, so a dict key of a million nested tuples (a 1 MB file) crashes the
    unpickler with a segmentation fault, where nothing can catch it. Tuples are built only from finished
    objects, so their depth is known when they are made. A malformed pickle is left for torch.load to refuse."""
    import io
    import pickletools

    mark = object()
    stack: list = []  # per stack slot: the depth of the tuples it holds (0: not a tuple), or the mark
    memo: dict = {}
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data) if isinstance(data, bytes) else data):
            name, before, after = op.name, op.stack_before, op.stack_after
            if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
                continue
            if name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, 0))
                continue
            if name == "DUP":
                stack.append(stack[-1])
                continue
            popped: list = []
            if pickletools.markobject in before:  # pops everything above the mark, the mark, then what lies below it
                at = len(stack) - 1 - stack[::-1].index(mark)
                popped, stack[at:] = stack[at + 1:], []
                del stack[len(stack) - before.index(pickletools.markobject):]
            elif before:
                popped, stack[-len(before):] = stack[-len(before):], []
            if name == "MARK":
                stack.append(mark)
            elif name == "TUPLE" or name in _TUPLE_ARITY or name == "EMPTY_TUPLE":
                depth = 1 + max(popped, default=0)
                if depth > MAX_DEPTH:
                    raise InputError(f"{where}: nests tuples deeper than {MAX_DEPTH} levels; a run file nests dicts, "
                                     "lists and tuples only a few levels deep (and hashing a deep one would crash "
                                     f"Python): this is not a run file hcdiag reads; write the run with "
                                     f"hcdiag.runfile.save_run, {_DOCS}.")
                stack.append(depth)
            else:
                stack.extend([0] * len(after))
    except InputError:
        raise
    except Exception:  # noqa: BLE001 (malformed: torch.load says what is wrong with it)
        return


def _check_zip(p: Path, where: str) -> None:
    """Check a torch zip file before ``torch.load`` reads it: every member stored as torch.save writes it
    (uncompressed: a compressed member may expand to any size) and matching its CRC-32 (torch does not
    check it, so a flipped bit would be used). Reads the file once (about 0.2 s per 100 MB)."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise InputError(f"{where}: its member {_short(info.filename)} is compressed (zip method "
                                     f"{info.compress_type}), which torch.save never does and which may expand to any "
                                     "size; write the run with torch.save / hcdiag.runfile.save_run, not a zip tool.")
            bad = zf.testzip()
            if bad is None:
                for name in zf.namelist():
                    if name.endswith("data.pkl"):  # torch.save's pickle: <archive>/data.pkl
                        _check_pickle_nesting(zf.read(name), where)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 (BadZipFile, EOFError, OSError, zlib.error, ...: each one line)
        raise InputError(f"{where}: is truncated or corrupt ({_first_line(exc)}); the torch file is incomplete: "
                         "copy it again or re-run the training.") from None
    if bad is not None:
        raise InputError(f"{where}: is corrupt: its member {_short(bad)} does not match its CRC-32 checksum (bits changed "
                         "on disk or in a copy); copy the file again from a good source or re-run the training.")


def load_run(path: str | os.PathLike, *, partial: bool = False, max_memory: int | None = None) -> Run:
    """Read and validate a run file; never unpickles anything but plain data.

    Only ``torch.load(path, weights_only=True, map_location='cpu')`` touches the file, so no code
    from it runs. Every problem is an :class:`InputError` whose one-line message starts with the
    path and says what to do. ``partial=True`` accepts a run still training (see
    :func:`validate_run`). ``max_memory`` (bytes; default :func:`default_max_memory`, half of this
    machine's memory) bounds what reading and checking the run may take: a larger file, or a run whose
    check would need more (docs/runfile.md, "Memory bound"), is refused before anything big is allocated.
    Before torch.load: only a regular file is opened (a FIFO or a device could block forever), and a zip
    file's members must be stored and match their CRC-32 (:func:`_check_zip`).
    """
    p = Path(path)
    limit = default_max_memory() if max_memory is None else int(max_memory)
    data = read_torch_file(p, max_memory=limit)
    if not isinstance(data, dict):
        raise InputError(f"{p}: is a torch file holding a {_kind(data)}, not an hcdiag run file "
                         f"(a dict with format={FORMAT!r}); {_DOCS}.")
    try:
        return Run(data, p, partial=partial, max_memory=limit)
    except InputError as exc:
        raise InputError(f"{p}: {marked(exc)}") from None


def read_torch_file(path: str | os.PathLike, *, max_memory: int | None = None) -> Any:
    """What a run file holds, read as :func:`load_run` reads it (the safety half of it, shared by every kind of
    run file hcdiag writes): a regular, readable, non-empty file within ``max_memory`` bytes, a zip whose members
    are stored and match their CRC-32 or a legacy pickle of bounded nesting, then ``torch.load(weights_only=True,
    map_location='cpu')``. Every problem is one :class:`InputError` line starting with the path."""
    p = Path(path)
    where = str(p)
    limit = default_max_memory() if max_memory is None else int(max_memory)
    if not p.exists():
        raise InputError(f"{where}: no such file; check the path (a run file is written by the trainer, e.g. run.pt).")
    if p.is_dir():
        hint = f" (it holds {p / 'run.pt'})" if (p / "run.pt").is_file() else ""
        raise InputError(f"{where}: is a directory, not a run file{hint}; pass the run file itself.")
    try:
        st = p.stat()
        if not stat.S_ISREG(st.st_mode):
            kind = next((what for test, what in _NOT_REGULAR if test(st.st_mode)), "a special file")
            raise InputError(f"{where}: is {kind}, not a regular file; hcdiag reads a run file only from a regular file "
                             "(reading a pipe or a device may never end): save it to a file first and pass that file.")
        # nonblocking: a FIFO swapped in since the stat cannot hang the open
        with open(p, "rb", opener=lambda f, flags: os.open(f, flags | getattr(os, "O_NONBLOCK", 0))) as fh:
            head = fh.read(4)
    except PermissionError:
        raise InputError(f"{where}: cannot be read (permission denied); fix its permissions (chmod u+r) "
                         "or copy it somewhere readable.") from None
    except OSError as exc:
        raise InputError(f"{where}: cannot be read ({_first_line(exc)}); check the file and the disk.") from None
    if not head:
        raise InputError(f"{where}: is empty (0 bytes), not a run file; it was never written: run the training again.")
    if st.st_size > limit:
        raise InputError(f"{where}: is {format_bytes(st.st_size)}, more than the memory bound ({_MAX_MEMORY}) of "
                         f"{format_bytes(limit)}, and loading it takes about its size in memory; raise {_MAX_MEMORY} if "
                         f"this machine has the memory (e.g. {_size_arg(2 * st.st_size)}), or check it on a "
                         "larger machine.")
    if head.startswith(b"PK"):
        _check_zip(p, where)
    elif head.startswith(b"\x80"):  # torch's legacy format: magic, protocol, system info, the data, storage keys
        with open(p, "rb") as fh:
            for _ in range(5):
                _check_pickle_nesting(fh, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notes are not the user's business
            data = torch.load(p, weights_only=True, map_location="cpu")
    except PermissionError:
        raise InputError(f"{where}: cannot be read (permission denied); fix its permissions (chmod u+r) "
                         "or copy it somewhere readable.") from None
    except RecursionError:
        raise InputError(f"{where}: nests too deeply to be read (RecursionError in torch.load); a run file nests "
                         f"dicts and lists only a few levels deep: write the run with hcdiag.runfile.save_run, {_DOCS}.") from None
    except MemoryError:
        raise InputError(f"{where}: does not fit in this machine's memory (MemoryError in torch.load); check it on a "
                         f"machine with more memory, or lower {_MAX_MEMORY} so such files are refused earlier.") from None
    except Exception as exc:  # torch raises many types for bad files; each becomes one line
        import pickle

        if isinstance(exc, pickle.UnpicklingError) and "weights only" in str(exc).lower():
            raise InputError(f"{where}: holds pickled objects a run file may not contain ({_unsafe_reason(exc)}); "
                             f"nothing from it was run: write the run with only {_ALLOWED}.") from None
        if head.startswith(b"PK") or head.startswith(b"\x80"):
            raise InputError(f"{where}: is truncated or corrupt ({_first_line(exc)}); the torch file is incomplete: "
                             "copy it again or re-run the training.") from None
        raise InputError(f"{where}: is not a torch file (torch.load failed: {_first_line(exc)}); "
                         "pass a run file written by torch.save / hcdiag.runfile.save_run.") from None
    return data


# --------------------------------------------------------------------------------------------
# writing


def _compact(obj: Any, depth: int = 0) -> Any:
    """A copy of ``obj`` in the run file's plain types, with compact CPU tensors.

    Tensors are detached, moved to CPU and made to own exactly their storage (torch.save writes a
    tensor's WHOLE storage, so a view ``x[:m]`` of the full dataset would silently carry the full
    dataset into the run file). numpy arrays become tensors; numpy scalars and subclasses of
    str/int/float/bool (``torch.__version__`` is one) become plain Python values. Anything else is
    left for :func:`validate_run` to refuse, and so is what nests deeper than :data:`MAX_DEPTH` (left as it
    is: no RecursionError here).
    """
    if depth > MAX_DEPTH:
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type != "cpu":
            return t.cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or not t.is_contiguous():
            return t.clone(memory_format=torch.contiguous_format)
        return t
    if isinstance(obj, dict):
        return {_compact(k, depth + 1): _compact(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_compact(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_compact(v, depth + 1) for v in obj)
    if obj is None or type(obj) in (str, bool, int, float):
        return obj
    for plain in (bool, str, int, float):  # bool before int: bool is an int
        if isinstance(obj, plain):
            return plain(obj)
    if type(obj).__module__ == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray) and obj.dtype != object:
            return torch.from_numpy(np.ascontiguousarray(obj).copy())
        if isinstance(obj, np.generic):
            return obj.item()
    return obj


# torch.save reports a failed write of the file object as a RuntimeError of its zip writer
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")


def _write_failure(exc: BaseException) -> str | None:
    """Why writing failed, in words (``No space left on device``), for an ``OSError`` or for the
    ``RuntimeError`` torch.save raises when the file's write fails (the ``OSError`` it carries, when
    any); None for anything else, which is a bug to show in full."""
    if isinstance(exc, OSError):
        return exc.strerror or _first_line(exc)
    if isinstance(exc, RuntimeError):
        seen, cause = set(), exc.__cause__ or exc.__context__
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, OSError):
                return cause.strerror or _first_line(cause)
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        if any(marker in str(exc) for marker in _TORCH_WRITE_FAILED):
            return f"torch.save failed: {' '.join(str(exc).split())[:120]}"
    return None


def save_run(run: dict, path: str | os.PathLike) -> Path:
    """Validate ``run`` (``partial=True``) and write it to ``path`` atomically; return the path.

    The run goes to a temporary file in the same folder, is flushed and fsynced, then moved over
    ``path`` with ``os.replace``: a crash leaves either the old file or the new one, never half of
    one, and the temporary file is removed on any failure. Tensors are written detached, on CPU
    and compact (a view does not drag its base's storage along). The parent folder is created
    when missing. numpy arrays/scalars and str/int/float subclasses (``torch.__version__``) are
    converted to tensors / plain values first; anything else outside the plain types is refused.
    """
    p = Path(path)
    run = _compact(run)
    try:
        validate_run(run, partial=True)
    except InputError as exc:
        raise InputError(f"refusing to write {p}: {marked(exc)}") from None
    return write_atomic(run, p)


def write_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (the writing half of :func:`save_run`, shared by every kind of
    run file hcdiag writes): a temporary in the same folder, flushed and fsynced, then renamed over ``path``; a
    failure leaves the previous file untouched and no temporary behind, and says so in one line."""
    p = Path(path)
    folder = p.parent
    if p.is_dir():
        raise InputError(f"{p}: is a directory; pass a file name for the run file (e.g. {p / 'run.pt'}).")
    blocker = next((q for q in [folder, *folder.parents] if q.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise InputError(f"{blocker}: is a file, not a folder, so {p} cannot be written there; choose another path.")
    from hcdiag.atomic import file_mode, temporary

    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = temporary(folder, p.name)  # also removes the temporaries a killed writer left
    except OSError as exc:
        reason = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or _first_line(exc))
        raise InputError(f"{folder}: cannot write the run file there ({reason}); choose a writable folder "
                         "or fix its permissions.") from None
    try:
        with os.fdopen(fd, "wb", closefd=False) as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode(p))  # mkstemp makes 0600; keep the old file's mode or the usual one
        os.replace(tmp, p)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        reason = _write_failure(exc)
        if reason is not None:
            raise InputError(f"{p}: could not write the run file ({reason}); "
                             "the previous file (if any) is untouched: free space or choose another folder.") from None
        raise
    finally:
        os.close(fd)  # releases the temporary's lock only now, after the rename or the unlink
    try:  # make the rename itself durable; not every file system lets a folder be fsynced
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return p


# --------------------------------------------------------------------------------------------
# a small valid run, for tests and demos


def example_run(R0: int = 4, K: int = 3, N: int = 5, m: int = 20, n: int = 2, *, seed: int = 0,
                method: str = "hct", snapshots: bool = True, outputs: bool = False,
                history: bool = True, references: bool = False, complete: bool = True,
                model: dict | None = None, state_fn=None, dtype: torch.dtype = torch.float32) -> dict:
    """A small, valid run dict with fake but consistent tensors (a test/demo helper).

    Shapes: eval.x (m, N); centroids (R0, K, N); outputs mu/logvar (m, n), xhat (m, N). The
    stage-1 rounds halve the active set from R0 down to 2 (R0 must be a power of two >= 2 for
    ``method='hct'``). ``complete=False`` gives a run stopped in stage 1 (status incomplete, no
    refinement/stage3, snapshots up to round 0), valid only with ``partial=True``.

    The default state_dicts are random parameters of ``hcdiag.models.LinearVAE`` (the ``linear``
    family), so the snapshots rebuild. For another architecture pass ``model`` (the ``config.model``
    dict) and ``state_fn(name) -> state_dict``. The parameters are random, but every number hcdiag
    recomputes is computed here as a trainer would: the outputs of a snapshot with parameters are its
    model's (``xhat = f(mu(x))`` on eval.x), and ``rounds[t].losses``/``eps``, ``refinement.eps_T`` and
    ``reached`` are eq. 8 on those outputs (docs/runfile.md, "Numbers hcdiag recomputes").
    """
    if method == "hct" and (R0 < 2 or R0 & (R0 - 1)):
        raise InputError(f"The 'R0' parameter must be a power of two >= 2 for method='hct'. Got {R0}.")
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    x = randn(m, N)
    centered = x - x.mean(0)
    eig = torch.linalg.eigvalsh((centered.T @ centered / max(m - 1, 1)).double()).flip(0).clamp_min(0).to(dtype)
    centroids = x[torch.randint(0, m, (R0, K), generator=g)] + 0.1 * randn(R0, K, N)  # (R0, K, N)
    lambda_max = float(eig[0])
    s2 = 2.0 * lambda_max
    cfg_model = model if model is not None else {
        "family": "linear", "input_dim": N, "latent_dim": n, "enc_widths": [], "dec_widths": [],
        "activation": "relu", "image_shape": None, "channels": [],
    }

    def default_state(name):
        # the parameter names of hcdiag.models.LinearVAE, so the default snapshots rebuild
        return {"enc_mu.weight": randn(n, N), "enc_mu.bias": randn(n), "enc_logvar": randn(n),
                "dec_out.weight": randn(N, n), "dec_out.bias": randn(N)}

    make_state = state_fn or default_state

    def rebuilt(state):
        """(mu, logvar, xhat) of ``state`` on eval.x as the checks compute them, or None if it does not load."""
        from hcdiag.models import build_model, encode_decode

        try:
            net = build_model(cfg_model)
            net.load_state_dict(state)
        except Exception:  # noqa: BLE001 (a deliberately wrong state_fn: the run is then refused on validation)
            return None
        return tuple(t.to(dtype) for t in encode_decode(net, x.float()))

    from hcdiag.metrics import clustering_losses

    def eq8(xhat):  # l_C = mean_x min_k ||xhat(x) - mu_k^C||^2 for every clustering, float64 (R0,)
        return clustering_losses(xhat.double(), centroids.double())

    # the snapshots of the training record: init, one per stage-1 round (halving R0 down to 2), refined, stage 3
    n_rounds = int(math.log2(R0)) - 1 if method == "hct" else 0
    if not complete:
        n_rounds = min(1, n_rounds)
    stage3_names = ["stage3_0", "stage3_1"]
    names = ["init"] + [f"round{t}" for t in range(n_rounds)]
    if complete:
        names += (["refined"] + stage3_names if method == "hct" else []) + ["final"]
    states = {name: make_state(name) for name in names} if snapshots else {}
    outs = {}
    for name in names:
        outs[name] = rebuilt(states[name]) if snapshots else None
        if outs[name] is None:
            outs[name] = (randn(m, n), randn(m, n), randn(m, N))
    losses_at = {name: eq8(outs[name][2]) for name in names}

    rounds, active = [], list(range(R0))
    for t in range(n_rounds):
        losses = losses_at[f"round{t}"]  # l_C of EVERY clustering at the end of round t
        kept = sorted(sorted(active, key=lambda c: (float(losses[c]), c))[: len(active) // 2])
        rounds.append({"round": t, "active": torch.tensor(active), "kept": torch.tensor(kept),
                       "losses": losses.to(dtype), "eps": float(losses[kept].max()), "snapshot": f"round{t}"})
        active = kept
    pair = active
    run: dict = {
        "format": FORMAT,
        "version": VERSION,
        "status": {"complete": complete, "stage": "done" if complete else "stage1", "error": None},
        "config": {
            "method": method,
            "dataset": {"name": "example", "split": "train", "preprocessing": "none", "image_shape": None,
                        "n": m, "N": N},
            "model": cfg_model if snapshots else None,
            "s2": s2, "lambda_max": lambda_max, "multiple": 2.0, "loss": "scaled",
            "beta": {"schedule": "linear", "start": 1.0, "end": 4.0},
            "hct": {"r0": R0, "k": int(math.log2(R0)) if method == "hct" else None, "mode": "cycle",
                    "epoch_unit": "steps", "eps": 1e-4} if method == "hct" else None,
            "seed": seed, "device": "cpu", "versions": {"torch": str(torch.__version__)},
        },
        "eval": {"x": x, "xbar": x.mean(0), "eigenvalues": eig, "rows": torch.arange(m)},
        "clusterings": {
            "centroids": centroids,
            "weights": torch.full((R0, K), 1.0 / K, dtype=dtype),
            "seeds": torch.arange(R0, dtype=torch.int64),
            "loglik": -randn(R0).abs(),
            "covariance_type": "diag",
            "covariances": 0.5 + randn(R0, K, N).abs(),
        },
        "rounds": rounds if method == "hct" else None,
        "refinement": None,
        "stage3": None,
        "snapshot_order": names,
    }
    if method == "hct" and complete:
        e, eps = 3, 1e-4
        l_ab = losses_at["refined"][pair]  # (2,)
        ref_losses = torch.cat([randn(e - 1, 2).abs(), l_ab.to(dtype)[None]])  # the last row is the refined model's
        run["refinement"] = {"pair": torch.tensor(pair), "reached": bool(float(l_ab.max()) < eps), "eps": eps,
                             "eps_T": float(l_ab.max()), "epochs": e, "losses": ref_losses, "snapshot": "refined"}
        run["stage3"] = {"clustering": pair[0], "epochs": 4, "snapshots": stage3_names}
    if snapshots:
        run["snapshots"] = states
    if outputs:
        run["outputs"] = {name: dict(zip(("mu", "logvar", "xhat"), outs[name])) for name in names}
    if history:
        h = 2 * len(names)
        run["history"] = {"step": torch.arange(h, dtype=torch.int64) * 10, "epoch": torch.arange(h, dtype=dtype) / 2,
                          "stage": torch.clamp(torch.arange(h) // max(1, h // 4), 0, 3),
                          "loss": randn(h).abs(), "recon": randn(h).abs(), "kl": randn(h).abs(),
                          "cluster": randn(h).abs(), "au": torch.randint(0, n + 1, (h,), generator=g).to(dtype),
                          "losses": randn(h, R0).abs()}
    if references:
        ref_cfg = {"s2": 10.0 * lambda_max, "multiple": 10.0, "method": "vanilla", "model": dict(cfg_model)}
        run["references"] = {name: {"config": dict(ref_cfg), "state": make_state(name), "metrics": {"kl": 0.0}}
                             for name in REFERENCE_NAMES}
    return run
