"""A recorder for anyone's own training loop: it writes the run file ``hcdiag check-barrier`` reads.

A researcher with their own PyTorch code gives the :class:`Recorder` the evaluation rows, the data (or
its mean and spectrum), the clusterings (or lets it fit them), the decoder variance and either a model
config hcdiag can rebuild or nothing (then the model's ``encode``/``decode`` are evaluated and only their
outputs are stored). From the loop it calls :meth:`Recorder.snapshot`, :meth:`Recorder.round`,
:meth:`Recorder.refinement`, :meth:`Recorder.stage3`, :meth:`Recorder.history` and
:meth:`Recorder.reference`; the recorder computes every number hcdiag recomputes (the outputs on
``eval.x``, ``l_C`` of every clustering, ``eps_t``, ``eps_T``, ``reached``) exactly as the checks do, so a
recorded run is checked like one of hcdiag's own trainer (docs/runfile.md). :meth:`Recorder.save` writes
a valid version-1 run file atomically (:func:`hcdiag.runfile.save_run`).

Conventions of hcdiag's trainer that the checks rely on, and which the recorder follows or expects:
snapshot names ``init``, ``round0``, ..., ``refined``, ``stage3_0``, ..., ``final`` (T4 certifies the
snapshot named ``final``, else the last one); ``snapshot_order`` is the order of recording; every model
is evaluated deterministically, ``mu, logvar = encode(x)``, ``xhat = decode(mu)`` on ``eval.x`` in eval
mode without gradients, in float32; ``l_C`` (eq. 8) in float64 from the float32 centroids the file stores.

>>> import torch
>>> from hcdiag.recorder import Recorder
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(200, 3, generator=g)
>>> rec = Recorder(x[:50], data=x, clusterings={"centroids": torch.randn(2, 2, 3, generator=g)},
...                multiple=2.0, method="vanilla")
>>> enc, dec = torch.nn.Linear(3, 4), torch.nn.Linear(2, 3)  # mu, logvar = the two halves of enc(x)
>>> rec.snapshot("final", encode=lambda x: enc(x).chunk(2, 1), decode=dec).xhat.shape
torch.Size([50, 3])
>>> rec.losses("final").shape, rec.losses("final").dtype
(torch.Size([2]), torch.float64)
"""

from __future__ import annotations

import math
import operator
import os
import platform
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from hcdiag.errors import InputError, NumericalError, marked
from hcdiag.losses import Schedule
from hcdiag.metrics import active_units, as_tensor, clustering_losses, kl_total, recon_mse
from hcdiag.models import ModelConfig, build_model, encode_decode
from hcdiag import records
from hcdiag.paper import LOSS_CONVENTIONS
from hcdiag.runfile import EVAL_BATCH_ROWS, FORMAT, REFERENCE_NAMES, VERSION, save_run, validate_run
from hcdiag.validation import as_data_matrix

__all__ = ["Outputs", "RefinementRecord", "Recorder", "RoundRecord"]

# paper 5.3: the constructed collapsed model is a vanilla VAE at s2 = 10 lambda_max (hcdiag's trainer default)
COLLAPSED_MULTIPLE = 10.0
# a history series given in some rows only is stored with NaN in the others (history values may be non-finite)
_FLOAT_SERIES = ("epoch", "loss", "recon", "kl_train", "cluster", "kl")


@dataclass(frozen=True, eq=False)
class Outputs:
    """A model's deterministic outputs on ``eval.x``: ``mu`` and ``logvar`` (m, n), ``xhat = decode(mu)``
    (m, N), float32 on the CPU; ``losses`` (R0,) float64, ``l_C`` of every clustering (eq. 8, squared
    data units)."""

    mu: torch.Tensor
    logvar: torch.Tensor
    xhat: torch.Tensor
    losses: torch.Tensor

    def copy(self) -> "Outputs":
        """A copy whose tensors the caller may change without changing what the recorder stores."""
        return Outputs(self.mu.clone(), self.logvar.clone(), self.xhat.clone(), self.losses.clone())


# what round() and refinement() return: the records the run file stores (hcdiag.records)
RoundRecord = records.Round
RefinementRecord = records.Refinement


def _cpu_state(module: Any, where: str) -> dict:
    """A detached CPU copy of ``module``'s state_dict (a module, or a state_dict itself)."""
    sd = module.state_dict() if hasattr(module, "state_dict") else module
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(f"{where} must be a torch module or its state_dict (names to tensors); got "
                         f"{type(module).__name__}.")
    return {str(k): v.detach().to("cpu", copy=True) for k, v in sd.items()}


def _finite_float(value: Any, where: str, *, positive: bool = False, finite: bool = True) -> float:
    """``value`` (a number or a one-element tensor, e.g. a loss still attached to its graph) as a float."""
    try:
        v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{where} must be a number; got {type(value).__name__}.") from None
    if (finite and not math.isfinite(v)) or (positive and not v > 0):
        raise InputError(f"{where} must be a finite number{' > 0' if positive else ''}; got {value!r}.")
    return v


def _int_at(value: Any, where: str, lo: int = 0) -> int:
    try:  # ints, numpy integers and one-element integer tensors; never bools or floats
        v = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        v = None
    if v is None or v < lo:
        raise InputError(f"{where} must be an integer >= {lo}; got {value!r}.")
    return int(v)


def _array(value: Any, where: str, ndim: int, shape: str) -> torch.Tensor:
    """``value`` as a CPU tensor with ``ndim`` dimensions (numpy arrays, lists and tensors accepted)."""
    try:
        t = as_tensor(value, name=where, ndim=ndim, shape=shape)
    except InputError as exc:
        raise InputError(marked(exc).replace(f"The '{where}' argument", where)) from None
    return t.detach().cpu()


def _need_finite(t: torch.Tensor, where: str, fix: str) -> torch.Tensor:
    bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
    if bad:
        raise InputError(f"{where} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()}; {fix}")
    return t


def _matrix(value: Any, name: str) -> np.ndarray:
    """``value`` (array or tensor) as a finite numpy matrix (n, N) (:func:`hcdiag.validation.as_data_matrix`)."""
    x, dropped = as_data_matrix(value, name=f"{name} argument", drop_nonfinite=True, min_rows=2)
    if dropped.size:  # refused, not dropped: the recorder must not change which rows the user meant
        raise InputError(f"{name} holds {dropped.size} row(s) with NaN or inf (first: row {int(dropped[0])}); pass "
                         "finite rows (drop or repair those).")
    return x


def _modules(*objs) -> list[torch.nn.Module]:
    """The torch modules among ``objs`` and the owners of bound methods among them (to set eval mode)."""
    out: list[torch.nn.Module] = []
    for o in objs:
        o = getattr(o, "__self__", o)
        if isinstance(o, torch.nn.Module) and all(o is not m for m in out):
            out.append(o)
    return out


class Recorder:
    """Records a training run of one's own loop and writes it as an hcdiag run file (docs/runfile.md).

    Parameters
    ----------
    x_eval : array or tensor of shape (m, N), finite: the evaluation rows every check evaluates on
        (hcdiag's trainer: up to 4096 rows drawn from the data). Stored as float32 ``eval.x``.
    data : array or tensor (n, N), or a :class:`hcdiag.data.Dataset`: the full data set. Gives the mean
        ``eval.xbar``, the spectrum (:func:`hcdiag.spectrum.spectrum`, top ``min(10, N)`` eigenvalues) and,
        without ``clusterings``, the EM fits. Not stored.
    xbar : array (N,), the full data's mean, when ``data`` is not given.
    eigenvalues : array (k,), descending, >= 0, the top eigenvalues of the data covariance (squared data
        units), when ``data`` is not given; ``[0]`` is lambda_max.
    clusterings : the R0 clusterings: a :class:`hcdiag.clusterings.ClusteringSet`, a dict with
        ``centroids`` (R0, K, N) and optionally ``weights`` (R0, K), ``seeds`` (R0,), ``loglik`` (R0,),
        ``covariances`` (R0, K, N) or (R0, K, N, N) with ``covariance_type``, ``resp`` (R0, m, K), or the
        centroids alone. None: fitted on ``data`` with :func:`hcdiag.clusterings.fit_clusterings` (``r0``
        runs of ``k`` components, first seed ``seed``, options ``em``). Responsibilities on ``x_eval`` (the
        teacher of T4) are computed wherever covariances are known.
    s2, multiple : the decoder variance (squared data units), or it as a multiple of lambda_max; give one.
    lambda_max : the top eigenvalue, when it is not ``eigenvalues[0]``.
    loss : the loss convention, ``literal``, ``scaled`` or ``mean`` (claims.md), if known.
    beta : the clustering-term weight: a number (constant), a dict ``{"schedule", "start", "end"}`` or a
        :class:`hcdiag.losses.Schedule`, if known.
    method : ``hct`` for a pipeline run (rounds, refinement and stage 3 are then required at
        :meth:`save`), else the producer's own name (``vanilla``, ...).
    model_config : a :class:`hcdiag.models.ModelConfig` or its dict (families ``mlp``, ``conv``,
        ``linear``): snapshots then store state_dicts, which must be exactly that model's (docs/runfile.md,
        "Parameter names"), and every check runs. None: the model is evaluated through ``encode``/``decode``
        (below, or the module's own methods) and only its outputs are stored; the parameter-space checks
        then say ``inconclusive`` and why.
    encode, decode : ``encode(x (B, N)) -> (mu (B, n), logvar (B, n))`` and ``decode(z (B, n)) -> xhat``
        (B, N) (or any shape with N values per row), for architectures hcdiag cannot rebuild.
    r0, k, em : the EM fits when ``clusterings`` is None (R0 a power of two for halving; ``em``: keyword
        arguments of ``fit_clusterings``, e.g. ``{"backend": "torch"}``).
    seed : the training seed (``config.seed``), also the first EM seed.
    rows : int array (m,), the indices of ``x_eval`` in the data (``eval.rows``), if known.
    dataset : a name or dict for ``config.dataset`` (default: from a ``Dataset``, else ``{"name": "array"}``).
    hct : extra ``config.hct`` entries (e.g. ``{"mode": "cycle", "epochs_per_round": 30}``).
    """

    def __init__(self, x_eval, *, data=None, xbar=None, eigenvalues=None, clusterings=None,
                 s2: float | None = None, multiple: float | None = None, lambda_max: float | None = None,
                 loss: str | None = None, beta=None, method: str = "hct", model_config=None,
                 encode: Callable | None = None, decode: Callable | None = None, r0: int | None = None,
                 k: int | None = None, em: dict | None = None, seed: int = 0, rows=None, dataset=None,
                 hct: dict | None = None):
        self.x = torch.as_tensor(np.array(_matrix(x_eval, "x_eval"), dtype=np.float32))  # (m, N), our own copy
        self.m, self.N = self.x.shape
        if not isinstance(method, str) or not method:
            raise InputError(f"method must be a name such as 'hct' or 'vanilla'; got {method!r}.")
        self.method = method
        self.seed = _int_at(seed, "seed")
        self._x_data, self._dataset = self._data(data, dataset)
        self.xbar, self.eigenvalues = self._moments(xbar, eigenvalues)
        self.lambda_max = (_finite_float(lambda_max, "lambda_max", positive=True) if lambda_max is not None
                           else float(self.eigenvalues[0]))
        if not self.lambda_max > 0:
            raise InputError("lambda_max of the data is 0 (constant data): a decoder variance as a multiple of it is "
                             "undefined; check the data.")
        if (s2 is None) == (multiple is None):
            raise InputError(f"give the decoder variance as s2 or as a multiple of lambda_max, exactly one of them; "
                             f"got s2={s2!r}, multiple={multiple!r}.")
        if s2 is not None:
            self.s2 = _finite_float(s2, "s2", positive=True)
            self.multiple = self.s2 / self.lambda_max
        else:
            self.multiple = _finite_float(multiple, "multiple", positive=True)
            self.s2 = self.multiple * self.lambda_max
        self.loss = self._loss(loss)
        self.beta = self._beta(beta)
        self.model_config = self._model_config(model_config)
        for name, fn in (("encode", encode), ("decode", decode)):
            if fn is not None and not callable(fn):
                raise InputError(f"{name} must be a function (e.g. model.{name}); got {type(fn).__name__}.")
        if (encode is None) != (decode is None):
            raise InputError("give encode and decode together (encode(x) -> (mu, logvar), decode(z) -> xhat), or "
                             "neither (the module's own encode/decode methods are used).")
        self._encode, self._decode = encode, decode
        self._clusterings = self._clusterings_of(clusterings, r0, k, em or {})
        self.centroids = self._clusterings["centroids"]  # (R0, K, N) float32, as stored
        self.r0, self.k = int(self.centroids.shape[0]), int(self.centroids.shape[1])
        self._rows = None
        if rows is not None:
            r = torch.as_tensor(rows if isinstance(rows, torch.Tensor) else np.asarray(rows))
            if r.is_floating_point() or r.is_complex() or r.dtype == torch.bool or tuple(r.shape) != (self.m,):
                raise InputError(f"rows must be {self.m} integer row indices of x_eval in the data; got dtype "
                                 f"{r.dtype} and shape {tuple(r.shape)}.")
            self._rows = r.detach().cpu().long()
        self._hct = dict(hct or {})
        self._net = None  # the model hcdiag rebuilds from model_config (CPU), built once
        self._n: int | None = self.model_config["latent_dim"] if self.model_config else None
        self._snapshots: dict[str, dict] = {}
        self._outputs: dict[str, Outputs] = {}
        self._order: list[str] = []
        self._rounds: list[records.Round] = []
        self._refinement: records.Refinement | None = None
        self._stage3: records.Stage3 | None = None
        self._history: list[dict] = []
        self._rows_at_round = 0  # history rows recorded before the last round: the refinement's come after
        self._references: dict[str, records.Reference] = {}

    # -- construction ----------------------------------------------------------------------------------------
    def _data(self, data, dataset):
        if data is None:
            ds = dataset if isinstance(dataset, dict) else {"name": dataset or "array"}
            return None, dict(ds, N=self.N)
        x = _matrix(getattr(data, "x", data), "data")
        if x.shape[1] != self.N:
            raise InputError(f"data has {x.shape[1]} columns but x_eval has N={self.N}; x_eval must be rows of data.")
        if isinstance(dataset, dict):
            ds = dict(dataset)
        elif dataset is not None:
            ds = {"name": str(dataset)}
        elif hasattr(data, "to_dict"):
            ds = data.to_dict()
        else:
            ds = {"name": "array"}
        ds.setdefault("n", int(x.shape[0]))
        ds.setdefault("N", self.N)
        return x, ds

    def _moments(self, xbar, eigenvalues):
        if self._x_data is not None:
            if xbar is None:
                xbar = torch.from_numpy(np.mean(self._x_data, axis=0, dtype=np.float64))  # no float64 copy of the data
            if eigenvalues is None:
                from hcdiag.spectrum import spectrum

                eigenvalues = spectrum(self._x_data, top=min(10, self.N)).eigenvalues
        missing = [name for name, v in (("xbar", xbar), ("eigenvalues", eigenvalues)) if v is None]
        if missing:
            raise InputError(f"{' and '.join(missing)} not given: pass data (the full data set, from which the "
                             "mean and the spectrum are computed) or both xbar and eigenvalues.")
        xbar = _need_finite(_array(xbar, "xbar", 1, "(N,)"), "xbar", "pass the mean of the full data set.")
        if xbar.shape[0] != self.N:
            raise InputError(f"xbar has {xbar.shape[0]} values but x_eval has N={self.N}; pass the data's mean.")
        eig = _need_finite(_array(eigenvalues, "eigenvalues", 1, "(k,)").double(), "eigenvalues",
                           "pass the data covariance's top eigenvalues.")
        if eig.numel() == 0 or eig.numel() > self.N or bool((eig < 0).any()) or \
                (eig.numel() > 1 and bool((eig[1:] > eig[:-1]).any())):
            raise InputError(f"eigenvalues must be 1 to N={self.N} values >= 0 in descending order (the data "
                             f"covariance's top eigenvalues, lambda_max first); got {eig.tolist()[:5]}.")
        return xbar.float(), eig

    def _loss(self, loss):
        if loss is not None and loss not in LOSS_CONVENTIONS:
            raise InputError(f"loss must be one of {', '.join(LOSS_CONVENTIONS)} (claims.md, loss conventions) or "
                             f"None if unknown; got {loss!r}.")
        return loss

    def _beta(self, beta):
        if beta is None or isinstance(beta, Schedule):
            return None if beta is None else beta.to_dict()
        if isinstance(beta, dict):
            start = _finite_float(beta.get("start", 1.0), "beta['start']")
            try:
                return Schedule(beta.get("schedule", "constant"), start,
                                _finite_float(beta.get("end", start), "beta['end']")).to_dict()
            except InputError as exc:
                raise InputError(f"beta: {marked(exc)}") from None
        b = _finite_float(beta, "beta")
        return Schedule("constant", b, b).to_dict()

    def _model_config(self, cfg):
        if cfg is None:
            return None
        if isinstance(cfg, dict):
            cfg = ModelConfig.from_dict(cfg)
        if not isinstance(cfg, ModelConfig):
            raise InputError(f"model_config must be a hcdiag.models.ModelConfig or its dict; got {type(cfg).__name__}.")
        if cfg.input_dim != self.N:
            raise InputError(f"model_config.input_dim is {cfg.input_dim} but x_eval has N={self.N}; describe the "
                             "model that reads these rows.")
        return cfg.to_dict()

    def _clusterings_of(self, cs, r0, k, em) -> dict:
        from hcdiag.clusterings import ClusteringSet, fit_clusterings

        if cs is None:
            if self._x_data is None or r0 is None or k is None:
                raise InputError("clusterings not given: pass clusterings (centroids [R0, K, N], or a ClusteringSet), "
                                 "or data with r0 and k to fit them (hcdiag.clusterings.fit_clusterings).")
            cs = fit_clusterings(self._x_data, r0, k, **{"seed": self.seed, **em})
        if isinstance(cs, ClusteringSet):
            cs = {"centroids": cs.centroids, "weights": cs.weights, "seeds": cs.seeds, "loglik": cs.loglik,
                  "covariances": cs.covariances, "covariance_type": cs.covariance_type}
        if not isinstance(cs, dict):
            cs = {"centroids": cs}
        keys = {"centroids", "weights", "seeds", "loglik", "covariances", "covariance_type", "resp"}
        unknown = sorted(set(cs) - keys)
        if unknown:
            raise InputError(f"clusterings has unknown key(s) {unknown}; it takes centroids, weights, seeds, loglik, "
                             "covariances, covariance_type and resp.")
        if cs.get("centroids") is None:
            raise InputError("clusterings['centroids'] is missing; pass the centroids of every clustering, [R0, K, N].")
        c = _need_finite(_array(cs["centroids"], "clusterings['centroids']", 3, "(R0, K, N)"),
                         "clusterings['centroids']", "pass finite centroids.").float()
        R, K, N = c.shape
        if N != self.N:
            raise InputError(f"clusterings['centroids'] has N={N} but x_eval has N={self.N}; both must describe the "
                             "same data.")
        out = {"centroids": c}
        # weights, seeds and loglik are stored but no check reads them: defaults where the producer has none
        defaults = {"weights": torch.full((R, K), 1.0 / K), "seeds": torch.arange(R) + self.seed,
                    "loglik": torch.zeros(R, dtype=torch.float64)}
        for key, shape, dtype in (("weights", (R, K), torch.float32), ("seeds", (R,), torch.int64),
                                  ("loglik", (R,), torch.float64)):
            v = cs.get(key)
            v = defaults[key] if v is None else _array(v, f"clusterings['{key}']", len(shape), str(shape))
            if tuple(v.shape) != shape:
                raise InputError(f"clusterings['{key}'] has shape {tuple(v.shape)} but the centroids give {shape}.")
            out[key] = _need_finite(v.to(dtype), f"clusterings['{key}']", "pass finite values.")
        cov_type = out["covariance_type"] = str(cs.get("covariance_type") or "diag")
        if cs.get("covariances") is not None:
            if cov_type not in ("diag", "full"):
                raise InputError(f"clusterings['covariance_type'] is {cov_type!r}; with covariances it must be 'diag' "
                                 "([R0, K, N]) or 'full' ([R0, K, N, N]).")
            cov = _array(cs["covariances"], "clusterings['covariances']", 3 if cov_type == "diag" else 4, "")
            variances = cov if cov_type == "diag" else torch.diagonal(cov, dim1=-2, dim2=-1)
            if bool((variances <= 0).any()) or not bool(torch.isfinite(cov).all()):
                raise InputError(f"clusterings['covariances'] holds {int((variances <= 0).sum())} variance(s) <= 0 or "
                                 "non-finite values; pass the EM's covariances (variances > 0, not standard "
                                 "deviations).")
            try:
                full = ClusteringSet(centroids=c.numpy(), weights=out["weights"].double().numpy(),
                                     covariances=cov.double().numpy(), covariance_type=cov_type,
                                     seeds=out["seeds"].numpy(), loglik=out["loglik"].numpy(), n_iter=np.zeros(R),
                                     converged=np.ones(R, dtype=bool), backend="given", init="given")
                # T4's teacher: P(k | x) of each clustering on the eval rows
                resp = None if cs.get("resp") is not None else full.responsibilities(self.x.numpy())
            except (InputError, NumericalError) as exc:  # shapes that disagree, a full covariance not positive definite
                raise InputError(f"clusterings: {marked(exc)}") from None
            out["covariances"] = cov.float()
            if resp is not None:
                out["resp"] = torch.as_tensor(resp, dtype=torch.float32)
        if cs.get("resp") is not None:
            resp = _array(cs["resp"], "clusterings['resp']", 3, "(R0, m, K)").float()
            if tuple(resp.shape) != (R, self.m, K):
                raise InputError(f"clusterings['resp'] has shape {tuple(resp.shape)}; it must be (R0, m, K) = "
                                 f"{(R, self.m, K)}: each clustering's P(k | x) on the rows of x_eval.")
            out["resp"] = resp
        return out

    # -- evaluation ------------------------------------------------------------------------------------------
    def _rebuilt(self):
        if self._net is None:
            self._net = build_model(self.model_config)
        return self._net

    def _load(self, net, state: dict, where: str, cfg: dict) -> None:
        """Load ``state`` into hcdiag's rebuild ``net`` of ``cfg``, or refuse naming what does not fit."""
        want = net.state_dict()
        missing = [k for k in want if k not in state]
        unexpected = [k for k in state if k not in want]
        shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
                  if k in state and state[k].shape != want[k].shape]
        if missing or unexpected or shapes:
            parts = [f"{label} {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}" for label, keys in
                     (("missing", missing), ("unexpected", unexpected), ("shapes differ:", shapes)) if keys]
            raise InputError(f"{where}: the state_dict does not fit the model config (family {cfg['family']!r}): "
                             f"{'; '.join(parts)}; name the module's layers as hcdiag's (docs/runfile.md, 'Parameter "
                             "names'), or record outputs only (no model_config).")
        _need_finite(torch.cat([v.detach().reshape(-1).double() for v in state.values() if v.is_floating_point()]
                               or [torch.zeros(0)]), f"{where}: the state_dict", "record the last finite model.")
        net.load_state_dict(state)

    def _run_pair(self, encode, decode, modules, where: str):
        """``(mu, logvar, xhat)`` of ``encode``/``decode`` on eval.x: eval mode, no gradients, float32 CPU."""
        params = [p for mod in modules for p in mod.parameters()]
        device = params[0].device if params else torch.device("cpu")
        dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
        was = [mod.training for mod in modules]
        for mod in modules:
            mod.eval()  # dropout off, batch-norm running statistics: a deterministic evaluation
        mus, lvs, xhs = [], [], []
        try:
            with torch.no_grad():
                for start in range(0, self.m, EVAL_BATCH_ROWS):
                    xb = self.x[start:start + EVAL_BATCH_ROWS].to(device=device, dtype=dtype)
                    enc = encode(xb)
                    if not (isinstance(enc, (tuple, list)) and len(enc) == 2 and all(isinstance(t, torch.Tensor)
                                                                                      for t in enc)):
                        raise InputError(f"{where}: encode(x) must return (mu, logvar), two tensors of shape (B, n); "
                                         f"got {type(enc).__name__}.")
                    mu, lv = enc
                    xh = decode(mu)
                    if not isinstance(xh, torch.Tensor):
                        raise InputError(f"{where}: decode(z) must return a tensor xhat of shape (B, N); got "
                                         f"{type(xh).__name__}.")
                    mus.append(mu.float().cpu())
                    lvs.append(lv.float().cpu())
                    # an image decoder's (B, C, H, W) is compared with the flat rows of eval.x
                    xhs.append(xh.float().cpu().flatten(1) if xh.dim() > 1 else xh.float().cpu())
        finally:
            for mod, w in zip(modules, was):
                mod.train(w)
        return torch.cat(mus), torch.cat(lvs), torch.cat(xhs)

    def _outputs_of(self, where: str, model=None, encode=None, decode=None, cfg: dict | None = None,
                    run_model: bool = True):
        """``(Outputs, state or None)`` of one model on eval.x. With a model config (``cfg``, else the
        recorder's), the module's state_dict is rebuilt by hcdiag and evaluated as the checks will; else
        ``encode``/``decode`` are evaluated: those given here, else (for the run's own model, ``run_model``)
        the recorder's pair, else the module's own methods."""
        cfg = cfg if cfg is not None else self.model_config
        if encode is None and run_model and self._encode is not None:
            encode, decode = self._encode, self._decode
        if encode is None:
            encode, decode = getattr(model, "encode", None), getattr(model, "decode", None)
        state = None
        if cfg is not None:
            if model is None:
                raise InputError(f"{where}: pass the model (a torch module or its state_dict): with a model config "
                                 "hcdiag stores and rebuilds its parameters.")
            state = _cpu_state(model, f"{where}: model")
            net = self._rebuilt() if cfg == self.model_config else build_model(cfg)
            self._load(net, state, where, cfg)
            mu, lv, xh = encode_decode(net, self.x)
            if callable(encode) and callable(decode) and isinstance(model, torch.nn.Module):
                self._same_model((mu, lv, xh), self._run_pair(encode, decode, _modules(model, encode, decode), where),
                                 where, cfg)
        else:
            if not (callable(encode) and callable(decode)):
                raise InputError(f"{where}: nothing to evaluate: pass a model with encode and decode methods, or "
                                 "encode=/decode= functions (or a model_config hcdiag can rebuild).")
            mu, lv, xh = self._run_pair(encode, decode, _modules(model, encode, decode), where)
        self._check_shapes(mu, lv, xh, where, self._n if run_model else None)
        for key, t in (("mu", mu), ("logvar", lv), ("xhat", xh)):
            _need_finite(t, f"{where}: {key} on x_eval", "a diverged model cannot be checked: record the last finite "
                                                         "one (or lower the learning rate).")
        # eq. 8 in float64 from the float32 xhat and centroids the run file stores: what check-barrier recomputes
        losses = clustering_losses(xh.double(), self.centroids.double())
        return Outputs(mu.contiguous(), lv.contiguous(), xh.contiguous(), losses), state

    def _check_shapes(self, mu, lv, xh, where: str, n: int | None) -> None:
        if mu.dim() != 2 or mu.shape[0] != self.m:
            raise InputError(f"{where}: mu has shape {tuple(mu.shape)}; encode must return mu of shape (B, n) for B "
                             "rows of x.")
        if lv.shape != mu.shape:
            raise InputError(f"{where}: logvar has shape {tuple(lv.shape)} but mu {tuple(mu.shape)}; encode must "
                             "return both of shape (B, n).")
        if tuple(xh.shape) != (self.m, self.N):
            raise InputError(f"{where}: xhat has {xh.shape[-1] if xh.dim() else 0} values per row but x_eval has "
                             f"N={self.N}; decode(z) must return a reconstruction of each row.")
        if n is not None and mu.shape[1] != n:
            raise InputError(f"{where}: mu has latent dimension {mu.shape[1]} but the run's model has n={n}; "
                             "record one model's trajectory per run.")

    def _same_model(self, rebuilt, own, where: str, cfg: dict) -> None:
        """Refuse a model config that does not describe the module (say ``gelu`` for a ReLU network): hcdiag
        would check the rebuild, another model than the one trained, and no stored number could tell."""
        # the tolerance check-barrier applies to stored outputs beside parameters (docs/runfile.md)
        from hcdiag.checks.evidence import output_tolerance

        for key, r, o in zip(("mu", "logvar", "xhat"), rebuilt, own):
            d = float((r.double() - o.double()).abs().max()) if r.shape == o.shape and r.numel() else math.inf
            tol = output_tolerance(r)
            if not d <= tol:
                raise InputError(f"{where}: the module's {key} differs from the model config's rebuild (family "
                                 f"{cfg['family']!r}, activation {cfg.get('activation')!r}) by {d:.3g} > {tol:.3g} on "
                                 "x_eval; model_config must describe the module (family, widths, activation), or "
                                 "record outputs only (no model_config).")

    # -- from the loop ---------------------------------------------------------------------------------------
    def _name(self, name: Any, where: str) -> str:
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}: the snapshot name must be a non-empty str such as 'round0'; got {name!r}.")
        return name

    def _known(self, name: Any, where: str) -> str:
        name = self._name(name, where)
        if name not in self._outputs:
            known = ", ".join(self._order[-6:]) or "none yet"
            raise InputError(f"{where} names snapshot {name!r}, which was never recorded (recorded: {known}); call "
                             f"recorder.snapshot({name!r}, model) first.")
        return name

    def _last(self, where: str) -> str:
        if not self._order:
            raise InputError(f"{where}: no snapshot recorded yet; call recorder.snapshot(name, model) first.")
        return self._order[-1]

    def snapshot(self, name: str, model=None, *, encode: Callable | None = None,
                 decode: Callable | None = None) -> Outputs:
        """Record the model as snapshot ``name`` (hcdiag's names: ``init``, ``round<t>``, ``refined``,
        ``stage3_<i>``, ``final``) and return its :class:`Outputs` on eval.x.

        With a model config the module's state_dict is stored (it must be exactly that model's) and the
        outputs are hcdiag's rebuild's; where the module has ``encode``/``decode`` (or the recorder has
        the pair) they must give the same outputs. Without one, ``encode``/``decode`` (given here, to the
        recorder, or the module's methods) are evaluated and their outputs stored. ``model`` is put in
        eval mode for the evaluation and back in its mode after it."""
        where = f"snapshot({name!r})"
        name = self._name(name, where)
        if name in self._outputs:
            raise InputError(f"{where}: a snapshot named {name!r} was already recorded; each name once, in training "
                             "order (e.g. round0, round1, ...).")
        out, state = self._outputs_of(where, model, encode, decode)
        self._n = int(out.mu.shape[1])
        self._outputs[name] = out
        if state is not None:
            self._snapshots[name] = state
        self._order.append(name)
        return out.copy()

    def outputs(self, name: str) -> Outputs:
        """The :class:`Outputs` recorded for snapshot ``name``."""
        return self._outputs[self._known(name, f"outputs({name!r})")].copy()

    def losses(self, name: str) -> torch.Tensor:
        """``l_C`` (eq. 8) of every clustering at snapshot ``name`` on eval.x: float64 (R0,), a copy (e.g. to
        choose the kept clusterings of a round by it)."""
        return self._outputs[self._known(name, f"losses({name!r})")].losses.clone()

    def _ids(self, value: Any, where: str) -> list[int]:
        try:
            ids = [operator.index(i) for i in (value.tolist() if hasattr(value, "tolist") else value)]
        except TypeError:
            raise InputError(f"{where} must be a list of clustering ids in 0..{self.r0 - 1}; got {value!r}.") from None
        if not ids or len(set(ids)) != len(ids) or any(not 0 <= i < self.r0 for i in ids):
            raise InputError(f"{where} must list distinct clustering ids in 0..{self.r0 - 1} (R0={self.r0}); "
                             f"got {ids}.")
        return ids

    def round(self, *, active, kept, snapshot: str | None = None) -> RoundRecord:
        """Record a stage-1 round: the active ids ``S_t``, the kept ids ``K_t`` (the producer's selection) and
        the snapshot at the end of the round (default: the last one recorded). The recorder computes ``l_C``
        of EVERY clustering there (eq. 8, float64) and ``eps_t = max over kept`` (Def. 4.2)."""
        t = len(self._rounds)
        where = f"round() {t}"
        if self._refinement is not None:
            raise InputError(f"{where}: the refinement is already recorded; stage-1 rounds come before it "
                             "(Algorithm 1).")
        a = self._ids(active, f"{where}: active")
        kk = self._ids(kept, f"{where}: kept")
        extra = sorted(set(kk) - set(a))
        if extra:
            raise InputError(f"{where}: kept holds {extra}, which are not in active {a}; kept must be a subset of "
                             "active (K_t is chosen from S_t).")
        snap = self._known(snapshot, f"{where}: snapshot") if snapshot is not None else self._last(where)
        losses = self._outputs[snap].losses.clone()  # (R0,)
        eps = float(losses[kk].max())
        self._rounds.append(records.Round(t, a, kk, losses, eps, snap, where=where))
        self._rows_at_round = len(self._history)
        return records.Round(t, a, kk, losses.clone(), eps, snap, where=where)  # the caller's copy

    def refinement(self, *, pair, eps: float, epochs: int, snapshot: str | None = None,
                   beta: float | None = None) -> RefinementRecord:
        """Record stage 2 on the final ``pair``: target ``eps``, ``epochs`` used, the refined ``snapshot``
        (default: the last one recorded; hcdiag's name is ``refined``) and optionally the clustering weight
        ``beta`` it trained with. The recorder computes ``eps_T = max(l_a, l_b)`` at the snapshot and
        ``reached = eps_T < eps``; the stored loss history is ``(l_a, l_b)`` of the history rows recorded
        with a model since the last round, else the refined snapshot's alone."""
        where = "refinement()"
        if self._refinement is not None:
            raise InputError(f"{where}: the refinement is already recorded; a run has one stage 2.")
        p = self._ids(pair, f"{where}: pair")
        if len(p) != 2:
            raise InputError(f"{where}: pair must hold 2 clustering ids (the final pair); got {p}.")
        eps = _finite_float(eps, f"{where}: eps", positive=True)
        said = self._hct.get("eps")
        if said is not None and not math.isclose(float(said), eps, rel_tol=1e-9):
            raise InputError(f"{where}: eps is {eps:g} but hct['eps'] given to the recorder is {float(said):g}; the "
                             "refinement's target is one number: give the same in both.")
        epochs = _int_at(epochs, f"{where}: epochs")
        snap = self._known(snapshot, f"{where}: snapshot") if snapshot is not None else self._last(where)
        losses = self._outputs[snap].losses
        eps_T = max(float(losses[p[0]]), float(losses[p[1]]))
        rows = [r["losses"][p].tolist() for r in self._history[self._rows_at_round:] if "losses" in r]
        history = torch.tensor(rows or [losses[p].tolist()], dtype=torch.float64).reshape(-1, 2)
        beta = _finite_float(beta, f"{where}: beta") if beta is not None else None
        self._refinement = records.Refinement(p, eps_T < eps, eps, eps_T, epochs, history, snap, beta, where=where)
        return records.Refinement(p, eps_T < eps, eps, eps_T, epochs, history.clone(), snap, beta, where=where)

    def stage3(self, *, clustering: int, snapshots: Sequence[str], epochs: int) -> None:
        """Record stage 3 (the stress test on one ``clustering``): its ``epochs`` and the snapshot names along
        the way (hcdiag's: ``stage3_0``, ``stage3_1``, ...; each recorded before)."""
        where = "stage3()"
        if self._stage3 is not None:
            raise InputError(f"{where}: stage 3 is already recorded; a run has one.")
        c = _int_at(clustering, f"{where}: clustering")
        if c >= self.r0:
            raise InputError(f"{where}: clustering is {c}, outside 0..{self.r0 - 1} (R0={self.r0}).")
        if isinstance(snapshots, str) or not isinstance(snapshots, (list, tuple)):
            raise InputError(f"{where}: snapshots must be a list of snapshot names; got {snapshots!r}.")
        names = [self._known(s, f"{where}: snapshots[{i}]") for i, s in enumerate(snapshots)]
        self._stage3 = records.Stage3(c, _int_at(epochs, f"{where}: epochs"), names, where=where)

    def history(self, *, step: int, epoch: float | None = None, stage: int | None = None, loss: float | None = None,
                recon: float | None = None, kl_train: float | None = None, cluster: float | None = None,
                kl: float | None = None, au: int | None = None, model=None) -> None:
        """Record one row of the training curves (``history``; optional, drawn by the report, read by no
        verdict). ``loss``, ``recon``, ``kl_train``, ``cluster``: the producer's training-batch terms.
        With ``model`` (evaluated like a snapshot, not stored) the row gets ``kl`` (nats), ``au`` (Burda's
        active units) and ``losses`` (l_C of every clustering) on eval.x; without it ``kl`` and ``au`` may be
        given. ``stage``: 0 EM, 1 rounds, 2 refinement, 3 stress test."""
        where = "history()"
        row: dict[str, Any] = {"step": _int_at(step, f"{where}: step")}
        if stage is not None:
            row["stage"] = _int_at(stage, f"{where}: stage")
            if row["stage"] > 3:
                raise InputError(f"{where}: stage must be 0 (EM), 1 (rounds), 2 (refinement) or 3 (stress test); got "
                                 f"{stage!r}.")
        if self._history and ("stage" in row) != ("stage" in self._history[0]):
            raise InputError(f"{where}: stage is given in {'this row' if 'stage' in row else 'earlier rows'} only; "
                             "give it in every row or in none.")
        for key, v in (("epoch", epoch), ("loss", loss), ("recon", recon), ("kl_train", kl_train),
                       ("cluster", cluster), ("kl", kl)):
            if v is not None:  # a diverged step is recorded as it is (history may be non-finite)
                row[key] = _finite_float(v, f"{where}: {key}", finite=False)
        if au is not None:
            row["au"] = _int_at(au, f"{where}: au")
        if model is not None:
            if kl is not None or au is not None:
                raise InputError(f"{where}: kl and au are computed on x_eval from model; drop them, or drop model "
                                 "(the training batch's KL goes in kl_train).")
            out, _ = self._outputs_of(where, model)
            row.update(kl=kl_total(out.mu, out.logvar), au=active_units(out.mu).count, losses=out.losses)
        self._history.append(row)

    def reference(self, name: str, model=None, *, encode: Callable | None = None, decode: Callable | None = None,
                  config: dict | None = None, s2: float | None = None, multiple: float | None = None,
                  snapshots: dict | None = None) -> dict:
        """Record a reference model (docs/runfile.md, ``references``) and return its metrics (KL in nats,
        Burda's active units, MSE per coordinate on eval.x).

        ``name``: ``collapsed`` (paper 5.3: vanilla at ``s2 = 10 lambda_max``, the default ``multiple``;
        T3, T4, I2, I3), ``vanilla`` (vanilla at the run's s2: I3's baseline; ``snapshots`` = ``{name:
        module or state_dict}`` along its training, in order) or ``control`` (trained only on the final
        pair: N3's probe). With a model config (the recorder's, or ``config["model"]`` for the reference's
        own architecture) its state_dict is stored; without one only ``collapsed`` can be recorded, as its
        outputs on eval.x (``encode``/``decode`` or the module's methods). ``config``: further entries of
        ``references.<name>.config`` (e.g. ``{"epochs": 8}``)."""
        where = f"reference({name!r})"
        if name not in REFERENCE_NAMES:
            raise InputError(f"{where}: name must be one of {', '.join(REFERENCE_NAMES)}; got {name!r}.")
        if name in self._references:
            raise InputError(f"{where}: the {name} reference is already recorded; a run has one of each.")
        rcfg = dict(config or {})
        given = sorted(set(rcfg) & {"s2", "multiple"})
        if given:
            raise InputError(f"{where}: give {' and '.join(given)} as argument(s) of reference(), not in config.")
        own = rcfg.pop("model", None)
        cfg = self._model_config(own) if own is not None else self.model_config
        if cfg is None and name != "collapsed":
            raise InputError(f"{where}: the {name} reference needs parameters hcdiag can rebuild, and this recorder "
                             f"has no model_config; give one in config={{'model': ...}}, or leave the {name} reference "
                             "out (outputs-only runs record only the collapsed reference).")
        if s2 is not None and multiple is not None:
            raise InputError(f"{where}: give s2 or multiple, not both.")
        if s2 is not None:
            s2 = _finite_float(s2, f"{where}: s2", positive=True)
            multiple = s2 / self.lambda_max
        else:
            default = COLLAPSED_MULTIPLE if name == "collapsed" else self.multiple
            multiple = _finite_float(default if multiple is None else multiple, f"{where}: multiple", positive=True)
            s2 = multiple * self.lambda_max
        out, state = self._outputs_of(where, model, encode, decode, cfg=cfg, run_model=False)
        metrics = {"kl": kl_total(out.mu, out.logvar), "au": active_units(out.mu).count,
                   "mse": recon_mse(self.x, out.xhat)}
        method = "hct-control" if name == "control" else "vanilla"
        ref_cfg = {"method": method, "s2": s2, "multiple": multiple, **rcfg}
        if name == "control" and "pair" not in ref_cfg and self._refinement is not None:
            ref_cfg["pair"] = list(self._refinement.pair)
        states, order = None, None
        if cfg is not None:
            ref_cfg["model"] = dict(cfg)
        if snapshots is not None:
            if name != "vanilla" or not isinstance(snapshots, dict):
                raise InputError(f"{where}: snapshots are the vanilla reference's {{name: module or state_dict}} along "
                                 "its training; pass them to reference('vanilla', ...) as a dict.")
            net, states = build_model(cfg), {}
            for sname, sd in snapshots.items():
                states[self._name(sname, f"{where}: snapshots")] = _cpu_state(sd, f"{where}: snapshots[{sname!r}]")
                self._load(net, states[sname], f"{where}: snapshots[{sname!r}]", cfg)
            order = list(states)
        self._references[name] = records.Reference(
            name, ref_cfg, state if cfg is not None else None,
            records.Outputs(out.mu, out.logvar, out.xhat, where=f"{where}: outputs") if cfg is None else None,
            states, order, metrics, where=where)
        return dict(metrics)

    # -- the run file ----------------------------------------------------------------------------------------
    @property
    def is_hct(self) -> bool:
        return self.method == "hct"

    def _missing(self) -> list[str]:
        """What a complete run still lacks, in words (empty when complete)."""
        missing = [] if self._order else ["a snapshot (recorder.snapshot)"]
        if self.is_hct:
            if not self._rounds and self.r0 > 2:
                missing.append("the stage-1 rounds (recorder.round)")
            if self._refinement is None:
                missing.append("the refinement (recorder.refinement)")
            if self._stage3 is None:
                missing.append("stage 3 (recorder.stage3)")
        return missing

    def _stage(self) -> str:
        if not self.is_hct:
            return "baseline"
        if self._refinement is None:
            return "stage1"
        return "stage3" if self._stage3 is None else "references"

    def _config(self) -> dict:
        import sklearn

        from hcdiag import __version__

        hct = None
        if self.is_hct:
            hct = {**self._hct, "r0": self.r0, "k": self.k}
            if self._refinement is not None:
                hct["eps"] = self._refinement.eps
        return records.RunConfig(
            self.method, float(self.s2), lambda_max=float(self.lambda_max), multiple=float(self.multiple),
            loss=self.loss, beta=dict(self.beta) if self.beta is not None else None, hct=hct,
            dataset=dict(self._dataset), model=dict(self.model_config) if self.model_config else None, seed=self.seed,
            versions={"hcdiag": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
                      "sklearn": sklearn.__version__, "python": platform.python_version()},
            extra={"producer": "hcdiag.Recorder"}).to_dict()

    def _history_dict(self) -> dict | None:
        if not self._history:
            return None
        rows = self._history
        out: dict[str, torch.Tensor] = {"step": torch.tensor([r["step"] for r in rows], dtype=torch.int64)}
        if "stage" in rows[0]:
            out["stage"] = torch.tensor([r["stage"] for r in rows], dtype=torch.int64)
        for key in _FLOAT_SERIES:
            if any(key in r for r in rows):
                out[key] = torch.tensor([r.get(key, math.nan) for r in rows], dtype=torch.float64)
        if any("au" in r for r in rows):
            whole = all("au" in r for r in rows)
            out["au"] = torch.tensor([r.get("au", math.nan) for r in rows],
                                     dtype=torch.int64 if whole else torch.float64)
        if any("losses" in r for r in rows):
            blank = torch.full((self.r0,), math.nan, dtype=torch.float64)
            out["losses"] = torch.stack([r.get("losses", blank) for r in rows])  # (h, R0)
        return records.History(out.pop("step"), out, where="history()").to_dict()

    def to_run(self, *, partial: bool = False) -> dict:
        """The run dict (version 1) as :meth:`save` writes it; ``partial=True`` for a run still training."""
        if not partial:
            missing = self._missing()
            if missing:
                what = "the hct run" if self.is_hct else "the run"
                raise InputError(f"{what} is incomplete: it lacks {', '.join(missing)}; record them, or save it with "
                                 "partial=True (a run still training).")
        ev = records.EvalSet(self.x.clone(), self.xbar.clone(), self.eigenvalues.clone(),
                             self._rows.clone() if self._rows is not None else None).to_dict()
        run: dict[str, Any] = {
            "format": FORMAT, "version": VERSION,
            "status": {"complete": not partial, "stage": "done" if not partial else self._stage(), "error": None},
            "config": self._config(), "eval": ev,
            "clusterings": records.Clusterings(**{k: (v.clone() if isinstance(v, torch.Tensor) else v)
                                                  for k, v in self._clusterings.items()}).to_dict(),
            "rounds": [r.to_dict() for r in self._rounds] if (self.is_hct or self._rounds) else None,
            "refinement": self._refinement.to_dict() if self._refinement is not None else None,
            "stage3": self._stage3.to_dict() if self._stage3 is not None else None,
            "history": self._history_dict(), "snapshot_order": list(self._order),
            "references": records.References(**self._references).to_dict(),
        }
        if self.model_config is not None:
            run["snapshots"] = dict(self._snapshots)
        else:
            run["outputs"] = {name: records.Outputs(o.mu, o.logvar, o.xhat, where=f"outputs.{name}").to_dict()
                              for name, o in self._outputs.items()}
        return run

    def save(self, path: str | os.PathLike, *, partial: bool = False):
        """Write the run file to ``path`` atomically (:func:`hcdiag.runfile.save_run`, which validates it) and
        return its path. A complete run (``partial=False``) must hold a snapshot and, for ``hct``, the rounds,
        the refinement and stage 3: otherwise it is refused with one line naming what is missing.
        ``partial=True`` writes a run still training (``hcdiag check-barrier --partial`` checks it)."""
        try:
            run = self.to_run(partial=partial)
            if not partial:
                validate_run(run)  # save_run validates as partial: a complete run must pass the full schema
        except InputError as exc:
            raise InputError(f"refusing to write {path}: {marked(exc)}") from None
        return save_run(run, path)
