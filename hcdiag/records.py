"""Typed run records: the parts of a run file (version 1) as small dataclasses.

Each record validates itself on construction (one-line :class:`~hcdiag.errors.InputError` naming the field by
its path in the file, e.g. ``rounds[2].kept``) and converts to and from the version-1 dict
(``Record.from_dict(d)`` / ``record.to_dict()``): the file format is unchanged, and the keys of each part are
spelled here only. The trainer and :class:`hcdiag.Recorder` build records; :func:`hcdiag.runfile.load_run`
returns a :class:`~hcdiag.runfile.Run` whose parts are records, and the checks read those.

=================  ===================================================================================
record             the run file's part
=================  ===================================================================================
:class:`Status`      ``status``: complete, stage, error
:class:`RunConfig`   ``config``: method, s2, lambda_max, multiple, loss, beta, hct, dataset, model, seed,
                     device, versions; every other key kept as-is in ``extra`` (``train``, ``fingerprint``)
:class:`EvalSet`     ``eval``: x, xbar, eigenvalues, rows
:class:`Clusterings` ``clusterings``: centroids, weights, seeds, loglik, covariance_type, covariances, resp
:class:`Round`       ``rounds[i]``: round, active, kept, losses, eps, snapshot (beta)
:class:`Refinement`  ``refinement``: pair, reached, eps, eps_T, epochs, losses, snapshot (beta, step)
:class:`Stage3`      ``stage3``: clustering, epochs, snapshots
:class:`History`     ``history``: step and the optional series (epoch, stage, loss, ..., losses)
:class:`Outputs`     ``outputs[name]`` and ``references.<r>.outputs``: mu, logvar, xhat on eval.x
:class:`Reference`   ``references.<r>``: config, state, outputs, snapshots, snapshot_order, metrics
:class:`References`  ``references``: collapsed, vanilla, control
:class:`Aggressive`  ``aggressive``: mi, ended_epoch
:class:`Teacher`     ``teacher``: clustering, beta_w, vertices, alpha, rule, I_T (the teacher-guided VAE)
=================  ===================================================================================

Rules that tie parts together (every dimension agreeing across parts, a named snapshot existing, a state
dict fitting ``config.model``, the memory bound) are :func:`hcdiag.runfile.validate_run`'s; a record checks
the dimensions it is given through a shared :class:`Dims` when one is passed (``dims=``), and the clustering
ids it holds against R0 when R0 is known.

>>> import torch
>>> r = Round(round=0, active=[0, 1, 2, 3], kept=[1, 3], losses=torch.tensor([4., 1., 3., 2.]), eps=2.0,
...           snapshot="round0")
>>> r.kept, Round.from_dict(r.to_dict()).eps
((1, 3), 2.0)
>>> Round(round=0, active=[0, 1], kept=[2], losses=torch.zeros(2), eps=0.0, snapshot="round0")
Traceback (most recent call last):
...
hcdiag.errors.InputError: Round.kept holds [2] which are not in Round.active; kept must be a subset of active.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from hcdiag.errors import InputError
from hcdiag.paper import LOSS_CONVENTIONS

DOCS = "see docs/runfile.md"
MODEL_FAMILIES = ("mlp", "conv", "linear")
REFERENCE_NAMES = ("collapsed", "vanilla", "control")
HISTORY_SERIES = ("epoch", "stage", "loss", "recon", "kl", "cluster", "au", "inner_steps")
RESP_ROW_TOL = 1e-4  # |sum_k resp[c, i, k] - 1| allowed in clusterings.resp (float32 storage of K probabilities)


# --------------------------------------------------------------------------------------------
# field checks (one line each, naming the field's path)

def kind(v: Any) -> str:
    t = type(v)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def need(d: dict, key: str, where: str, what: str = "") -> Any:
    if key not in d:
        full = f"{where}.{key}" if where else key
        raise InputError(f"{full} is missing; a run file needs it{(' (' + what + ')') if what else ''}; {DOCS}.")
    return d[key]


def dict_at(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise InputError(f"{where} must be a dict; got {kind(v)}; {DOCS}.")
    return v


def int_at(v: Any, where: str, lo: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise InputError(f"{where} must be an int; got {v!r} ({kind(v)}).")
    if lo is not None and v < lo:
        raise InputError(f"{where} must be an int >= {lo}; got {v}.")
    return v


def str_at(v: Any, where: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(v, str):
        raise InputError(f"{where} must be a str; got {v!r} ({kind(v)}).")
    if choices is not None and v not in choices:
        raise InputError(f"{where} must be one of {', '.join(choices)}; got {v!r}.")
    return v


def bool_at(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise InputError(f"{where} must be a bool; got {v!r} ({kind(v)}).")
    return v


def float_at(v: Any, where: str, positive: bool = False, finite: bool = True) -> float:
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype.is_floating_point:
        v = v.item()
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise InputError(f"{where} must be a float; got {v!r} ({kind(v)}).")
    if finite and not math.isfinite(v):
        raise InputError(f"{where} must be finite; got {v!r}.")
    if positive and not v > 0:
        raise InputError(f"{where} must be a float > 0; got {v!r}.")
    return float(v)


def tensor_at(v: Any, where: str, ndim: int | tuple[int, ...], *, kind_: str = "float",
              finite: bool = False) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise InputError(f"{where} must be a tensor; got {kind(v)}; {DOCS}.")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if v.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise InputError(f"{where} must be a {want} tensor; got shape {tuple(v.shape)}; {DOCS}.")
    if kind_ == "float" and not v.dtype.is_floating_point:
        raise InputError(f"{where} must be a floating-point tensor; got dtype {v.dtype}.")
    if kind_ == "int" and (v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool):
        raise InputError(f"{where} must be an integer tensor (int64); got dtype {v.dtype}.")
    if finite and kind_ == "float":
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise InputError(f"{where} holds {bad} non-finite value(s) (NaN or inf) of {v.numel()}; "
                             "the checks need finite values there: fix the producer and write the run again.")
    return v


def int_list(v: Any, where: str) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise InputError(f"{where} must be a list of ints; got {kind(v)}.")
    for i, x in enumerate(v):
        int_at(x, f"{where}[{i}]", lo=1)
    return list(v)


def shape_list(v: Any, where: str, allowed=(3,)) -> None:
    dims = int_list(v, where)
    if len(dims) not in allowed:
        want = " or ".join({2: "[H, W]", 3: "[C, H, W]"}[a] for a in allowed)
        raise InputError(f"{where} must be {want}; got {list(dims)}.")


def model_fields(model: Any, where: str) -> dict:
    """A ``config.model`` dict's own fields (whether hcdiag can build it is :func:`hcdiag.runfile.validate_run`'s)."""
    dict_at(model, where)
    str_at(need(model, "family", where), f"{where}.family", MODEL_FAMILIES)
    int_at(need(model, "input_dim", where), f"{where}.input_dim", lo=1)
    int_at(need(model, "latent_dim", where), f"{where}.latent_dim", lo=1)
    for key in ("enc_widths", "dec_widths", "channels"):
        if model.get(key) is not None:
            int_list(model[key], f"{where}.{key}")
    if model.get("activation") is not None:
        from hcdiag.models import _ACTIVATIONS

        str_at(model["activation"], f"{where}.activation", tuple(_ACTIVATIONS))
    shape = model.get("image_shape")
    if model["family"] == "conv" and shape is None:
        raise InputError(f"{where}.image_shape is missing; a conv model needs [C, H, W] to be rebuilt.")
    if shape is not None:
        shape_list(shape, f"{where}.image_shape")
    return model


def state_dict_at(state: Any, where: str) -> dict:
    """A state_dict: a dict of tensors (whether it fits its model is :func:`hcdiag.runfile.validate_run`'s)."""
    dict_at(state, where)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{where}.{key} must be a tensor (a state_dict holds tensors); got {kind(value)}.")
    return state


class Dims:
    """The run's dimensions (N, R0, K, m, n, h, ...): every occurrence must agree with the first one seen."""

    def __init__(self):
        self.seen: dict[str, tuple[int, str]] = {}  # dim name -> (value, key it came from)

    def agree(self, dim: str, value: int, where: str) -> None:
        if dim in self.seen:
            first, src = self.seen[dim]
            if first != value:
                raise InputError(f"{src} has {dim}={first} but {where} has {dim}={value}; "
                                 "both must describe the same run: fix the producer.")
        else:
            self.seen[dim] = (int(value), where)

    def get(self, dim: str) -> int | None:
        return self.seen[dim][0] if dim in self.seen else None


def ids_at(v: Any, where: str, r0: int | None) -> tuple[int, ...]:
    """Distinct clustering ids (an int tensor, or a list of ints when built in code), each in 0..R0-1."""
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            int_at(x, f"{where}[{i}]")
        ids = [int(x) for x in v]
    else:
        ids = [int(i) for i in tensor_at(v, where, 1, kind_="int").tolist()]
    out = [i for i in ids if i < 0 or (r0 is not None and i >= r0)]
    if out:
        span = f"0..{r0 - 1} (R0={r0})" if r0 is not None else "0..R0-1"
        raise InputError(f"{where} holds clustering id(s) {out[:5]} outside {span}.")
    if len(set(ids)) != len(ids):
        raise InputError(f"{where} repeats clustering ids ({ids}); each id may appear once.")
    return tuple(ids)


def _ids_tensor(ids: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(list(ids), dtype=torch.int64)


def _set(obj, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # a frozen record normalises its own fields on construction


def _extra(d: dict, known: tuple[str, ...]) -> dict:
    return {k: v for k, v in d.items() if k not in known}


# --------------------------------------------------------------------------------------------
# the records

@dataclass(frozen=True, eq=False)
class Status:
    """``status``: whether the run is complete, the stage it reached, the error that stopped it."""

    complete: bool = True
    stage: str = "done"
    error: str | None = None
    where: InitVar[str] = "status"

    def __post_init__(self, where):
        bool_at(self.complete, f"{where}.complete")
        str_at(self.stage, f"{where}.stage")
        if self.error is not None:
            str_at(self.error, f"{where}.error")

    @classmethod
    def from_dict(cls, d: Any, where: str = "status") -> Status:
        dict_at(d, where)
        return cls(need(d, "complete", where), d.get("stage", ""), d.get("error"), where=where)

    def to_dict(self) -> dict:
        return {"complete": self.complete, "stage": self.stage, "error": self.error}


_CONFIG_KEYS = ("method", "s2", "lambda_max", "multiple", "loss", "beta", "hct", "dataset", "model", "seed",
                "device", "versions")


@dataclass(frozen=True, eq=False)
class RunConfig:
    """``config``: how the run was made. ``model`` is the ``config.model`` dict (None: hcdiag cannot rebuild
    the model); ``extra`` holds every other key as-is (hcdiag's trainer: ``train``, ``fingerprint``)."""

    method: str
    s2: float
    lambda_max: float | None = None
    multiple: float | None = None
    loss: str | None = None
    beta: dict | None = None
    hct: dict | None = None
    dataset: dict | None = None
    model: dict | None = None
    seed: int | None = None
    device: str | None = None
    versions: dict | None = None
    extra: dict = field(default_factory=dict)
    where: InitVar[str] = "config"

    def __post_init__(self, where):
        str_at(self.method, f"{where}.method")
        _set(self, "s2", float_at(self.s2, f"{where}.s2", positive=True))
        for key in ("lambda_max", "multiple"):
            if getattr(self, key) is not None:
                _set(self, key, float_at(getattr(self, key), f"{where}.{key}", positive=True))
        if self.loss is not None:
            str_at(self.loss, f"{where}.loss", LOSS_CONVENTIONS)
        if self.beta is not None:
            dict_at(self.beta, f"{where}.beta")
            if "schedule" in self.beta:
                str_at(self.beta["schedule"], f"{where}.beta.schedule")
            for key in ("start", "end"):
                if key in self.beta:
                    float_at(self.beta[key], f"{where}.beta.{key}")
        if self.seed is not None:
            int_at(self.seed, f"{where}.seed")
        if self.device is not None:
            str_at(self.device, f"{where}.device")
        for key in ("versions", "hct"):
            if getattr(self, key) is not None:
                dict_at(getattr(self, key), f"{where}.{key}")
        if self.hct is not None:
            if self.hct.get("r0") is not None:
                int_at(self.hct["r0"], f"{where}.hct.r0", lo=1)
        if self.dataset is not None:
            dict_at(self.dataset, f"{where}.dataset")
            if self.dataset.get("N") is not None:
                int_at(self.dataset["N"], f"{where}.dataset.N", lo=1)
            if self.dataset.get("image_shape") is not None:  # grayscale: [H, W]
                shape_list(self.dataset["image_shape"], f"{where}.dataset.image_shape", allowed=(2, 3))
        if self.model is not None:
            model_fields(self.model, f"{where}.model")
        dict_at(self.extra, f"{where} (its other keys)")

    @classmethod
    def from_dict(cls, d: Any, where: str = "config") -> RunConfig:
        dict_at(d, where)
        need(d, "method", where, "the training method, e.g. 'hct'")
        need(d, "s2", where, "the decoder variance")
        return cls(**{k: d[k] for k in _CONFIG_KEYS if k in d}, extra=_extra(d, _CONFIG_KEYS), where=where)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in _CONFIG_KEYS if getattr(self, k) is not None or k in ("model", "hct")}
        out.update(self.extra)
        return out

    @property
    def is_hct(self) -> bool:
        """A run of Historical Consensus Training: ``method == "hct"`` or an ``hct`` dict."""
        return self.method == "hct" or isinstance(self.hct, dict)

    @property
    def train(self) -> dict | None:
        """hcdiag's trainer's settings (``config.train``), None for other producers."""
        return self.extra.get("train")


@dataclass(frozen=True, eq=False)
class EvalSet:
    """``eval``: the evaluation rows ``x`` (m, N) every check evaluates on, the FULL data's mean ``xbar`` (N,),
    the top covariance ``eigenvalues`` (k,) descending, and optionally the rows' indices ``rows`` (m,)."""

    x: torch.Tensor
    xbar: torch.Tensor
    eigenvalues: torch.Tensor
    rows: torch.Tensor | None = None
    where: InitVar[str] = "eval"
    dims: InitVar[Dims | None] = None

    def __post_init__(self, where, dims):
        dims = dims if dims is not None else Dims()
        x = tensor_at(self.x, f"{where}.x", 2, finite=True)
        dims.agree("m", x.shape[0], f"{where}.x")
        dims.agree("N", x.shape[1], f"{where}.x")
        xbar = tensor_at(self.xbar, f"{where}.xbar", 1, finite=True)
        dims.agree("N", xbar.shape[0], f"{where}.xbar")
        eig = tensor_at(self.eigenvalues, f"{where}.eigenvalues", 1, finite=True)
        if eig.numel() == 0:
            raise InputError(f"{where}.eigenvalues is empty; store at least lambda_max (the top eigenvalue).")
        if eig.numel() > x.shape[1]:
            raise InputError(f"{where}.eigenvalues has {eig.numel()} values but the data has N={x.shape[1]} dimensions.")
        if bool((eig < 0).any()):
            raise InputError(f"{where}.eigenvalues holds {int((eig < 0).sum())} negative value(s); eigenvalues of a "
                             "covariance are >= 0: clip round-off negatives to 0.")
        if eig.numel() > 1 and bool((eig[1:] > eig[:-1]).any()):
            raise InputError(f"{where}.eigenvalues must be sorted in descending order; sort them (largest first).")
        if self.rows is not None:
            rows = tensor_at(self.rows, f"{where}.rows", 1, kind_="int")
            dims.agree("m", rows.shape[0], f"{where}.rows")

    @classmethod
    def from_dict(cls, d: Any, where: str = "eval", dims: Dims | None = None) -> EvalSet:
        dict_at(d, where)
        return cls(need(d, "x", where, "the evaluation subset [m, N]"), need(d, "xbar", where, "the full-data mean [N]"),
                   need(d, "eigenvalues", where, "the top data eigenvalues"), d.get("rows"), where=where, dims=dims)

    def to_dict(self) -> dict:
        out = {"x": self.x, "xbar": self.xbar, "eigenvalues": self.eigenvalues}
        if self.rows is not None:
            out["rows"] = self.rows
        return out

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])


@dataclass(frozen=True, eq=False)
class Clusterings:
    """``clusterings``: the R0 EM clusterings: ``centroids`` (R0, K, N), ``weights`` (R0, K), ``seeds`` (R0,),
    ``loglik`` (R0,), ``covariance_type``; optionally ``covariances`` and the responsibilities ``resp``
    (R0, m, K) on eval.x (the witness check's teacher)."""

    centroids: torch.Tensor
    weights: torch.Tensor
    seeds: torch.Tensor
    loglik: torch.Tensor
    covariance_type: str
    covariances: torch.Tensor | None = None
    resp: torch.Tensor | None = None
    where: InitVar[str] = "clusterings"
    dims: InitVar[Dims | None] = None

    def __post_init__(self, where, dims):
        dims = dims if dims is not None else Dims()
        c = tensor_at(self.centroids, f"{where}.centroids", 3, finite=True)
        for name, size in zip(("R0", "K", "N"), c.shape):
            dims.agree(name, size, f"{where}.centroids")
        if c.shape[0] < 1 or c.shape[1] < 1:
            raise InputError(f"{where}.centroids has shape {tuple(c.shape)}; it needs R0 >= 1 clusterings of K >= 1 centroids.")
        w = tensor_at(self.weights, f"{where}.weights", 2, finite=True)
        dims.agree("R0", w.shape[0], f"{where}.weights")
        dims.agree("K", w.shape[1], f"{where}.weights")
        seeds = tensor_at(self.seeds, f"{where}.seeds", 1, kind_="int")
        dims.agree("R0", seeds.shape[0], f"{where}.seeds")
        ll = tensor_at(self.loglik, f"{where}.loglik", 1, finite=True)
        dims.agree("R0", ll.shape[0], f"{where}.loglik")
        ctype = str_at(self.covariance_type, f"{where}.covariance_type")
        if self.covariances is not None:
            cov = tensor_at(self.covariances, f"{where}.covariances", (3, 4), finite=True)
            for name, size in zip(("R0", "K", "N"), cov.shape):
                dims.agree(name, size, f"{where}.covariances")
            if cov.ndim == 4:
                dims.agree("N", cov.shape[3], f"{where}.covariances (last axis)")
            want = {"diag": 3, "full": 4}.get(ctype)
            if want is not None and cov.ndim != want:
                raise InputError(f"{where}.covariances is {cov.ndim}-D but covariance_type is {ctype!r}, "
                                 f"which needs a {want}-D tensor.")
        if self.resp is not None:
            resp = tensor_at(self.resp, f"{where}.resp", 3, finite=True)
            for name, size in zip(("R0", "m", "K"), resp.shape):
                dims.agree(name, size, f"{where}.resp")
            neg = int((resp < 0).sum())
            if neg:
                raise InputError(f"{where}.resp holds {neg} negative value(s); responsibilities are probabilities "
                                 "(>= 0, each row summing to 1): store the GMM's posterior P(k | x) on eval.x.")
            off = (resp.double().sum(2) - 1).abs() > RESP_ROW_TOL  # (R0, m)
            if bool(off.any()):
                ci, i = (int(v) for v in off.nonzero()[0])
                raise InputError(f"{where}.resp rows must sum to 1 (within {RESP_ROW_TOL:g}); {int(off.sum())} of "
                                 f"{off.numel()} do not (first: clustering {ci}, eval row {i}, sum "
                                 f"{float(resp[ci, i].double().sum()):.6g}): store each clustering's posterior "
                                 "P(k | x) on eval.x, normalised over its K components.")

    @classmethod
    def from_dict(cls, d: Any, where: str = "clusterings", dims: Dims | None = None) -> Clusterings:
        dict_at(d, where)
        return cls(need(d, "centroids", where, "[R0, K, N]"), need(d, "weights", where, "[R0, K]"),
                   need(d, "seeds", where, "the EM seeds [R0]"), need(d, "loglik", where, "[R0]"),
                   need(d, "covariance_type", where), d.get("covariances"), d.get("resp"), where=where, dims=dims)

    def to_dict(self) -> dict:
        out = {"centroids": self.centroids, "weights": self.weights, "seeds": self.seeds, "loglik": self.loglik,
               "covariance_type": self.covariance_type}
        for key in ("covariances", "resp"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @property
    def r0(self) -> int:
        return int(self.centroids.shape[0])


_ROUND_KEYS = ("round", "active", "kept", "losses", "eps", "snapshot", "beta")


@dataclass(frozen=True, eq=False)
class Round:
    """``rounds[i]``: one stage-1 round: its number, the active ids S_t, the kept ids K_t (a subset), l_C of
    EVERY clustering (R0,) at its snapshot, eps_t = max over K_t of l_C, the snapshot's name; hcdiag's
    trainer also records the KL weight ``beta`` at the round's end."""

    round: int
    active: tuple[int, ...]
    kept: tuple[int, ...]
    losses: torch.Tensor
    eps: float
    snapshot: str
    beta: float | None = None
    extra: dict = field(default_factory=dict)
    where: InitVar[str] = "Round"
    dims: InitVar[Dims | None] = None

    def __post_init__(self, where, dims):
        dims = dims if dims is not None else Dims()
        r0 = dims.get("R0")
        int_at(self.round, f"{where}.round", lo=0)
        _set(self, "active", ids_at(self.active, f"{where}.active", r0))
        _set(self, "kept", ids_at(self.kept, f"{where}.kept", r0))
        extra = sorted(set(self.kept) - set(self.active))
        if extra:
            raise InputError(f"{where}.kept holds {extra} which are not in {where}.active; kept must be a subset of active.")
        losses = tensor_at(self.losses, f"{where}.losses", 1, finite=True)
        dims.agree("R0", losses.shape[0], f"{where}.losses")
        _set(self, "eps", float_at(self.eps, f"{where}.eps"))
        str_at(self.snapshot, f"{where}.snapshot")
        if self.beta is not None:
            _set(self, "beta", float_at(self.beta, f"{where}.beta", finite=False))

    @classmethod
    def from_dict(cls, d: Any, where: str = "Round", dims: Dims | None = None) -> Round:
        dict_at(d, where)
        return cls(need(d, "round", where), need(d, "active", where), need(d, "kept", where),
                   need(d, "losses", where, "l_C of every clustering"), need(d, "eps", where), need(d, "snapshot", where),
                   d.get("beta"), _extra(d, _ROUND_KEYS), where=where, dims=dims)

    def to_dict(self) -> dict:
        out = {"round": self.round, "active": _ids_tensor(self.active), "kept": _ids_tensor(self.kept),
               "losses": self.losses, "eps": self.eps, "snapshot": self.snapshot}
        if self.beta is not None:
            out["beta"] = self.beta
        out.update(self.extra)
        return out


_REFINEMENT_KEYS = ("pair", "reached", "eps", "eps_T", "epochs", "losses", "snapshot", "beta", "step")


@dataclass(frozen=True, eq=False)
class Refinement:
    """``refinement`` (stage 2): the final ``pair`` (a, b), whether ``max(l_a, l_b) < eps`` was ``reached``, the
    target ``eps``, ``eps_T`` = max(l_a, l_b) at the refined model, the ``epochs`` used, the (e, 2) history
    ``losses`` and the refined model's ``snapshot``; hcdiag's trainer adds ``beta`` and the optimizer ``step``."""

    pair: tuple[int, int]
    reached: bool
    eps: float
    eps_T: float  # noqa: N815 (the paper's symbol)
    epochs: int
    losses: torch.Tensor
    snapshot: str
    beta: float | None = None
    step: int | None = None
    extra: dict = field(default_factory=dict)
    where: InitVar[str] = "Refinement"
    dims: InitVar[Dims | None] = None

    def __post_init__(self, where, dims):
        pair = ids_at(self.pair, f"{where}.pair", dims.get("R0") if dims is not None else None)
        if len(pair) != 2:
            raise InputError(f"{where}.pair must hold 2 clustering ids; got {list(pair)}.")
        _set(self, "pair", pair)
        bool_at(self.reached, f"{where}.reached")
        _set(self, "eps", float_at(self.eps, f"{where}.eps", positive=True))
        _set(self, "eps_T", float_at(self.eps_T, f"{where}.eps_T", finite=False))
        int_at(self.epochs, f"{where}.epochs", lo=0)
        losses = tensor_at(self.losses, f"{where}.losses", 2)
        if losses.shape[1] != 2:
            raise InputError(f"{where}.losses must have shape [e, 2] (l_a, l_b per epoch); got {tuple(losses.shape)}.")
        str_at(self.snapshot, f"{where}.snapshot")
        if self.beta is not None:
            _set(self, "beta", float_at(self.beta, f"{where}.beta", finite=False))
        if self.step is not None:
            int_at(self.step, f"{where}.step", lo=0)

    @classmethod
    def from_dict(cls, d: Any, where: str = "Refinement", dims: Dims | None = None) -> Refinement:
        dict_at(d, where)
        return cls(need(d, "pair", where), need(d, "reached", where), need(d, "eps", where), need(d, "eps_T", where),
                   need(d, "epochs", where), need(d, "losses", where, "[e, 2] history of l_a, l_b"),
                   need(d, "snapshot", where), d.get("beta"), d.get("step"), _extra(d, _REFINEMENT_KEYS),
                   where=where, dims=dims)

    def to_dict(self) -> dict:
        out = {"pair": _ids_tensor(self.pair), "reached": self.reached, "eps": self.eps, "eps_T": self.eps_T,
               "epochs": self.epochs, "losses": self.losses, "snapshot": self.snapshot}
        if self.beta is not None:
            out["beta"] = self.beta
        if self.step is not None:
            out["step"] = self.step
        out.update(self.extra)
        return out


@dataclass(frozen=True, eq=False)
class Stage3:
    """``stage3`` (the stress test): the single ``clustering`` trained on, its ``epochs`` and the
    ``snapshots`` taken along the way."""

    clustering: int
    epochs: int
    snapshots: tuple[str, ...]
    where: InitVar[str] = "Stage3"
    dims: InitVar[Dims | None] = None

    def __post_init__(self, where, dims):
        r0 = dims.get("R0") if dims is not None else None
        c = int_at(self.clustering, f"{where}.clustering", lo=0)
        if r0 is not None and c >= r0:
            raise InputError(f"{where}.clustering is {c}, outside 0..{r0 - 1} (R0={r0}).")
        int_at(self.epochs, f"{where}.epochs", lo=0)
        if not isinstance(self.snapshots, (list, tuple)):
            raise InputError(f"{where}.snapshots must be a list of snapshot names; got {kind(self.snapshots)}.")
        for i, name in enumerate(self.snapshots):
            str_at(name, f"{where}.snapshots[{i}]")
        _set(self, "snapshots", tuple(self.snapshots))

    @classmethod
    def from_dict(cls, d: Any, where: str = "Stage3", dims: Dims | None = None) -> Stage3:
        dict_at(d, where)
        return cls(need(d, "clustering", where), need(d, "epochs", where), need(d, "snapshots", where),
                   where=where, dims=dims)

    def to_dict(self) -> dict:
        return {"clustering": self.clustering, "epochs": self.epochs, "snapshots": list(self.snapshots)}


@dataclass(frozen=True, eq=False)
class History:
    """``history``: per-row training curves, every series of the same length h. ``step`` (h,) is required;
    ``series`` maps the others present (``epoch``, ``stage`` in 0..3, ``loss``, ``recon``, ``kl``, ``cluster``,
    ``au``, ``inner_steps``; ``losses`` (h, R0); a producer's own, e.g. ``kl_train``) to their tensors."""

    step: torch.Tensor
    series: dict = field(default_factory=dict)
    where: InitVar[str] = "history"
    dims: InitVar[Dims | None] = None

    def __post_init__(self, where, dims):
        dims = dims if dims is not None else Dims()
        step = tensor_at(self.step, f"{where}.step", 1, kind_="int")
        dims.agree("h", step.shape[0], f"{where}.step")
        dict_at(self.series, f"{where} (its series)")
        for key in HISTORY_SERIES:
            if self.series.get(key) is not None:
                t = tensor_at(self.series[key], f"{where}.{key}", 1, kind_="int" if key == "stage" else "any")
                dims.agree("h", t.shape[0], f"{where}.{key}")
        stage = self.series.get("stage")
        if stage is not None and stage.numel() and bool(((stage < 0) | (stage > 3)).any()):
            raise InputError(f"{where}.stage holds values outside 0..3 (0: EM, 1: rounds, 2: refinement, 3: stress test).")
        if self.series.get("losses") is not None:
            losses = tensor_at(self.series["losses"], f"{where}.losses", 2)
            dims.agree("h", losses.shape[0], f"{where}.losses")
            dims.agree("R0", losses.shape[1], f"{where}.losses")

    @classmethod
    def from_dict(cls, d: Any, where: str = "history", dims: Dims | None = None) -> History:
        dict_at(d, where)
        return cls(need(d, "step", where), {k: v for k, v in d.items() if k != "step"}, where=where, dims=dims)

    def to_dict(self) -> dict:
        return {"step": self.step, **self.series}

    def get(self, key: str) -> torch.Tensor | None:
        """The series ``key`` (``"step"`` included), or None when absent."""
        return self.step if key == "step" else self.series.get(key)

    def __len__(self) -> int:
        return int(self.step.shape[0])


@dataclass(frozen=True, eq=False)
class Outputs:
    """``outputs[name]``: a model's ``mu`` (m, n), ``logvar`` (m, n) and ``xhat = f(mu)`` (m, N) on eval.x."""

    mu: torch.Tensor
    logvar: torch.Tensor
    xhat: torch.Tensor
    where: InitVar[str] = "Outputs"
    dims: InitVar[Dims | None] = None
    latent: InitVar[str] = "n"

    def __post_init__(self, where, dims, latent):
        dims = dims if dims is not None else Dims()
        mu = tensor_at(self.mu, f"{where}.mu", 2, finite=True)
        lv = tensor_at(self.logvar, f"{where}.logvar", 2, finite=True)
        xh = tensor_at(self.xhat, f"{where}.xhat", 2, finite=True)
        for t, key in ((mu, "mu"), (lv, "logvar"), (xh, "xhat")):
            dims.agree("m", t.shape[0], f"{where}.{key}")
        dims.agree(latent, mu.shape[1], f"{where}.mu")
        dims.agree(latent, lv.shape[1], f"{where}.logvar")
        dims.agree("N", xh.shape[1], f"{where}.xhat")

    @classmethod
    def from_dict(cls, d: Any, where: str = "Outputs", dims: Dims | None = None, latent: str = "n") -> Outputs:
        dict_at(d, where)
        return cls(need(d, "mu", where), need(d, "logvar", where), need(d, "xhat", where), where=where, dims=dims,
                   latent=latent)

    def to_dict(self) -> dict:
        return {"mu": self.mu, "logvar": self.logvar, "xhat": self.xhat}

    def astuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.mu, self.logvar, self.xhat


_REFERENCE_KEYS = ("config", "state", "outputs", "snapshots", "snapshot_order", "metrics")


@dataclass(frozen=True, eq=False)
class Reference:
    """``references.<name>``: a reference model: its ``config`` (s2, multiple, method, its own ``model`` or
    None for the run's), its parameters ``state``, or for ``collapsed`` only its ``outputs`` on eval.x; the
    vanilla reference's training ``snapshots`` and their ``snapshot_order``; ``metrics``."""

    name: str
    config: dict
    state: dict | None = None
    outputs: Outputs | None = None
    snapshots: dict | None = None
    snapshot_order: tuple[str, ...] | None = None
    metrics: dict | None = None
    extra: dict = field(default_factory=dict)
    where: InitVar[str | None] = None

    def __post_init__(self, where):
        str_at(self.name, "a reference's name", REFERENCE_NAMES)
        where = where or f"references.{self.name}"
        cfg = dict_at(self.config, f"{where}.config")
        float_at(need(cfg, "s2", f"{where}.config"), f"{where}.config.s2", positive=True)
        float_at(need(cfg, "multiple", f"{where}.config"), f"{where}.config.multiple", positive=True)
        str_at(need(cfg, "method", f"{where}.config"), f"{where}.config.method")
        if cfg.get("model") is not None:
            model_fields(cfg["model"], f"{where}.config.model")
        if self.state is None and (self.outputs is None or self.name != "collapsed"):
            what = ("its parameters (a state_dict) or, for a model hcdiag cannot rebuild, its outputs on eval.x"
                    if self.name == "collapsed" else "its parameters (a state_dict of its config.model)")
            raise InputError(f"{where}.state is missing; a reference needs {what}; {DOCS}.")
        if self.state is not None:
            state_dict_at(self.state, f"{where}.state")
        if self.outputs is not None and not isinstance(self.outputs, Outputs):
            raise InputError(f"{where}.outputs must be an Outputs record; got {kind(self.outputs)}.")
        if self.snapshots is not None:
            dict_at(self.snapshots, f"{where}.snapshots")
            for sname, sd in self.snapshots.items():
                str_at(sname, f"a {where}.snapshots key")
                state_dict_at(sd, f"{where}.snapshots.{sname}")
            order = self.snapshot_order
            if order is not None:
                if not isinstance(order, (list, tuple)) or sorted(map(str, order)) != sorted(self.snapshots) \
                        or len(set(order)) != len(order):
                    raise InputError(f"{where}.snapshot_order must list every name of {where}.snapshots once, in "
                                     f"training order; got {list(order) if isinstance(order, (list, tuple)) else kind(order)} "
                                     f"for {sorted(self.snapshots)}.")
                _set(self, "snapshot_order", tuple(order))
        if self.metrics is not None:
            dict_at(self.metrics, f"{where}.metrics")

    @classmethod
    def from_dict(cls, name: str, d: Any, where: str | None = None, dims: Dims | None = None) -> Reference:
        where = where or f"references.{name}"
        dict_at(d, where)
        cfg = dict_at(need(d, "config", where), f"{where}.config")
        outs = d.get("outputs")
        if outs is not None:
            outs = Outputs.from_dict(outs, f"{where}.outputs", dims, latent=f"n of {where}")
        return cls(name, cfg, d.get("state"), outs, d.get("snapshots"), d.get("snapshot_order"), d.get("metrics"),
                   _extra(d, _REFERENCE_KEYS), where=where)

    def to_dict(self) -> dict:
        out: dict = {"config": self.config}
        if self.state is not None:
            out["state"] = self.state
        if self.outputs is not None:
            out["outputs"] = self.outputs.to_dict()
        if self.snapshots is not None:
            out["snapshots"] = self.snapshots
        if self.snapshot_order is not None:
            out["snapshot_order"] = list(self.snapshot_order)
        if self.metrics is not None:
            out["metrics"] = self.metrics
        out.update(self.extra)
        return out

    @property
    def model(self) -> dict | None:
        """The reference's own ``config.model``; None means the run's."""
        return self.config.get("model")

    @property
    def order(self) -> list[str]:
        """Its training snapshots' names in training order (``snapshot_order``, else the keys' order)."""
        if self.snapshot_order is not None:
            return list(self.snapshot_order)
        return list(self.snapshots or {})


@dataclass(frozen=True, eq=False)
class References:
    """``references``: the ``collapsed`` model (T3, T4, I2, I3), the ``vanilla`` reference at the run's s2
    (I3's baseline) and the no-history ``control`` (N3), each a :class:`Reference` or None."""

    collapsed: Reference | None = None
    vanilla: Reference | None = None
    control: Reference | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in REFERENCE_NAMES:
            ref = getattr(self, name)
            if ref is not None and not (isinstance(ref, Reference) and ref.name == name):
                raise InputError(f"references.{name} must be a Reference named {name!r}; got {kind(ref)}.")

    @classmethod
    def from_dict(cls, d: Any, where: str = "references", dims: Dims | None = None) -> References:
        dict_at(d, where)
        refs = {name: Reference.from_dict(name, d[name], f"{where}.{name}", dims)
                for name in REFERENCE_NAMES if d.get(name) is not None}
        return cls(**refs, extra=_extra(d, REFERENCE_NAMES))

    def to_dict(self) -> dict:
        out = {name: getattr(self, name).to_dict() for name in REFERENCE_NAMES if getattr(self, name) is not None}
        out.update(self.extra)
        return out

    def get(self, name: str) -> Reference | None:
        """The reference ``name`` (collapsed, vanilla or control), or None when the run has none."""
        return getattr(self, name) if name in REFERENCE_NAMES else None

    def __iter__(self):
        return (getattr(self, n) for n in REFERENCE_NAMES if getattr(self, n) is not None)


_TEACHER_KEYS = ("clustering", "rule", "I_T", "alpha", "beta_w", "vertices", "view", "view_samples", "features",
                 "projection", "gmm")


@dataclass(frozen=True, eq=False)
class Teacher:
    """``teacher``: the teacher-guided VAE's record: the teacher's ``clustering`` id, the ``rule`` that chose it,
    every clustering's teacher information ``I_T`` (nats, on eval.x), the alignment weight ``alpha``, the
    witness's inverse temperature ``beta_w`` and its simplex ``vertices`` (K, n); the teacher's ``view`` of x
    (:mod:`hcdiag.views`; absent: ``identity``) and the training's ``view_samples`` per row; the teacher's
    ``features`` (``input`` or ``pca:<d>``) and, for a PCA teacher, its ``projection`` (``mean`` (N,),
    ``components`` (d, N)) and ``gmm`` (the chosen mixture in the clusterings' form, one fit: ``centroids``
    (1, K, d), ``weights`` (1, K), ``covariance_type``, ``covariances``, ``seeds``, ``loglik``)."""

    clustering: int
    beta_w: float
    vertices: torch.Tensor
    alpha: float | None = None
    rule: str | None = None
    I_T: tuple[float, ...] | None = None  # noqa: N815 (the notes' symbol)
    view: str | None = None
    view_samples: int | None = None
    features: str | None = None
    projection: dict | None = None
    gmm: dict | None = None
    extra: dict = field(default_factory=dict)
    where: InitVar[str] = "teacher"
    dims: InitVar[Dims | None] = None

    def __post_init__(self, where, dims):
        dims = dims if dims is not None else Dims()
        c = int_at(self.clustering, f"{where}.clustering", lo=0)
        r0 = dims.get("R0")
        if r0 is not None and c >= r0:
            raise InputError(f"{where}.clustering is {c}, outside 0..{r0 - 1} (R0={r0}).")
        _set(self, "beta_w", float_at(self.beta_w, f"{where}.beta_w", positive=True))
        v = tensor_at(self.vertices, f"{where}.vertices", 2, finite=True)
        dims.agree("K", v.shape[0], f"{where}.vertices")
        dims.agree("n", v.shape[1], f"{where}.vertices")
        if self.alpha is not None:
            a = float_at(self.alpha, f"{where}.alpha")
            if a < 0:
                raise InputError(f"{where}.alpha must be a float >= 0; got {a!r}.")
            _set(self, "alpha", a)
        if self.rule is not None:
            str_at(self.rule, f"{where}.rule")
        if self.I_T is not None:
            if not isinstance(self.I_T, (list, tuple)):
                raise InputError(f"{where}.I_T must be a list of floats (one per clustering); got {kind(self.I_T)}.")
            _set(self, "I_T", tuple(float_at(x, f"{where}.I_T[{i}]") for i, x in enumerate(self.I_T)))
        if self.view is not None:
            from hcdiag.views import parse_view

            str_at(self.view, f"{where}.view")
            try:
                parse_view(self.view)
            except InputError as exc:
                raise InputError(f"{where}.view {self.view!r} is not a view hcdiag knows ({str(exc)}).") from None
        if self.view_samples is not None:
            int_at(self.view_samples, f"{where}.view_samples", lo=1)
        self._pca(where, dims)

    def _pca(self, where: str, dims: Dims) -> None:
        from hcdiag.train.methods.teacher import parse_features

        d = None
        if self.features is not None:
            try:
                d = parse_features(str_at(self.features, f"{where}.features"))
            except InputError as exc:
                raise InputError(f"{where}.features {self.features!r} is not one hcdiag knows ({str(exc)}).") from None
        if d is None:
            extra = [k for k in ("gmm", "projection") if getattr(self, k) is not None]
            if extra:
                raise InputError(f"{where} has {' and '.join(extra)} but its features are "
                                 f"{self.features or 'input (absent)'}: only a pca:<d> teacher has them; fix the producer.")
            return
        proj = dict_at(self.projection, f"{where}.projection")
        mean = tensor_at(need(proj, "mean", f"{where}.projection", "[N]"), f"{where}.projection.mean", 1, finite=True)
        dims.agree("N", mean.shape[0], f"{where}.projection.mean")
        comps = tensor_at(need(proj, "components", f"{where}.projection", "[d, N]"), f"{where}.projection.components",
                          2, finite=True)
        if tuple(comps.shape) != (d, mean.shape[0]):
            raise InputError(f"{where}.projection.components has shape {tuple(comps.shape)}; {self.features} over "
                             f"N = {mean.shape[0]} needs ({d}, {mean.shape[0]}).")
        own = Dims()
        for name, size in (("R0", 1), ("K", int(self.vertices.shape[0])), ("N", d)):
            own.agree(name, size, f"{where}.{self.features} teacher")
        Clusterings.from_dict(self.gmm, f"{where}.gmm", own)
    @classmethod
    def from_dict(cls, d: Any, where: str = "teacher", dims: Dims | None = None) -> Teacher:
        dict_at(d, where)
        return cls(need(d, "clustering", where), need(d, "beta_w", where), need(d, "vertices", where, "[K, n]"),
                   d.get("alpha"), d.get("rule"), d.get("I_T"), d.get("view"), d.get("view_samples"),
                   d.get("features"), d.get("projection"), d.get("gmm"), _extra(d, _TEACHER_KEYS), where=where, dims=dims)

    def to_dict(self) -> dict:
        out = {"clustering": self.clustering, "beta_w": self.beta_w, "vertices": self.vertices}
        for key in ("alpha", "rule", "view", "view_samples", "features", "projection", "gmm"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.I_T is not None:
            out["I_T"] = list(self.I_T)
        out.update(self.extra)
        return out


@dataclass(frozen=True, eq=False)
class Aggressive:
    """``aggressive``: the aggressive baseline's MI (nats, eval.x) per aggressive epoch and the last epoch
    trained aggressively (None: the whole run)."""

    mi: torch.Tensor
    ended_epoch: int | None = None
    where: InitVar[str] = "aggressive"

    def __post_init__(self, where):
        mi = tensor_at(self.mi, f"{where}.mi", 1)
        if self.ended_epoch is not None:
            int_at(self.ended_epoch, f"{where}.ended_epoch", lo=1)
            if self.ended_epoch != mi.shape[0]:
                raise InputError(f"{where}.ended_epoch is {self.ended_epoch} but {where}.mi holds {mi.shape[0]} "
                                 "epoch(s); MI is estimated at the end of every aggressive epoch, the last one "
                                 "included: fix the producer.")

    @classmethod
    def from_dict(cls, d: Any, where: str = "aggressive") -> Aggressive:
        dict_at(d, where)
        return cls(need(d, "mi", where, "[e] MI in nats at the end of each aggressive epoch"), d.get("ended_epoch"),
                   where=where)

    def to_dict(self) -> dict:
        return {"mi": self.mi, "ended_epoch": self.ended_epoch}


__all__ = ["Aggressive", "Clusterings", "Dims", "EvalSet", "History", "Outputs", "Reference", "References",
           "Refinement", "Round", "RunConfig", "Stage3", "Status", "Teacher"]
