"""The system under test: Historical Consensus Training and its baselines, writing run files.

Stages of ``hct`` (claims.md, Training pipeline; paper section 4.2 and Algorithm 1):

0. EM ``R0`` times with different seeds (:mod:`hcdiag.clusterings`).
1. Rounds: train on the active set ``S_t`` for ``epochs_per_round`` cycles, then evaluate ``l_C`` of EVERY
   clustering (active and discarded) and keep the best ``keep_ratio`` of ``S_t`` (ties by id) until two
   remain.
2. Refinement on the last pair until ``max(l_a, l_b) < eps`` or ``refine_cap`` cycles (recorded).
3. Stress test on one clustering for ``stage3_epochs`` cycles, with snapshots along the way.

A *cycle* gives every active clustering ``steps_per_clustering`` steps, interleaved (Algorithm 1's
"epoch" is one step per clustering). ``epoch_unit='epochs'`` (section 4.2.1's reading) sets
``steps_per_clustering`` to one full pass over the data. ``mode='cycle'`` uses one clustering's term
per step (Algorithm 1); ``mode='simultaneous'`` puts every active clustering's term in every step
(section 4.1), computed with one batched distance product.

Baselines: ``vanilla``, ``beta`` (any KL weight, < 1 allowed), ``anneal`` (KL weight 0 -> 1),
``freebits`` (Kingma et al. 2016, per dimension), ``aggressive`` (He et al. 2019 aggressive encoder
training, our stand-in for the paper's "EM-type VAE"). References (same architecture and init seed):
the constructed collapsed model (vanilla at ``10 lambda_max``, paper 5.3), a vanilla run at the same s2,
and a no-history control trained from scratch on the final pair only.

The run file is written atomically at the end of every round and stage; ``resume=True`` continues a
partial run and gives the same final run as an uninterrupted one (bitwise on CPU, deterministic mode).
"""

from __future__ import annotations

import copy
import math
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from hcdiag.device import resolve_device
from hcdiag.errors import InputError, NumericalError
from hcdiag.losses import LossWeights, Schedule, gaussian_kl, reparameterize
from hcdiag.models import WIDTH_PRESETS, ModelConfig, build_model, encode_decode
from hcdiag.paper import LOSS_CONVENTIONS
from hcdiag.paper import METHODS as PAPER_METHODS

Method = Literal["hct", "vanilla", "beta", "anneal", "freebits", "aggressive"]
METHODS = PAPER_METHODS
STAGE_CODES = {"stage0": 0, "stage1": 1, "stage2": 2, "stage3": 3, "baseline": 1, "reference": 4}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; presets fill it, flags override any field."""

    method: str = "hct"
    multiple: float = 2.0
    loss: str = "literal"
    # architecture
    arch: str = "mlp"
    latent_dim: int = 8
    enc_widths: tuple[int, ...] = (256, 128)
    dec_widths: tuple[int, ...] = (128, 256)
    activation: str = "relu"
    channels: tuple[int, ...] = (32, 64)
    # optimisation
    lr: float = 3e-3
    batch_size: int = 512
    epochs: int = 30  # baselines and references: data epochs
    # clusterings (stage 0)
    r0: int = 16
    k: int = 8
    covariance: str = "diag"
    em_backend: str = "sklearn"
    em_init: str = "kmeans"
    uneven: bool = False
    # Historical Consensus
    mode: str = "cycle"
    epoch_unit: str = "steps"
    steps_per_clustering: int = 1
    epochs_per_round: int = 30
    keep_ratio: float = 0.5
    eps: float = 1e-4
    refine_cap: int = 200
    stage3_epochs: int = 30
    stage3_snapshots: int = 4
    beta_schedule: str = "linear"
    beta_start: float = 1.0
    beta_end: float = 4.0
    # baselines
    kl_weight: float = 1.0
    anneal_epochs: int = 10
    free_bits: float = 0.1
    # He et al. 2019 aggressive schedule: encoder-only steps before each decoder step, at most
    # aggressive_max_inner, stopped early when the mean loss of a block of aggressive_check_every steps
    # is higher than the previous block's (their text.py: sub_iter < 100, sub_iter % 15)
    aggressive_max_inner: int = 100
    aggressive_check_every: int = 15
    baseline_snapshots: int = 5
    # references
    references: tuple[str, ...] = ("collapsed", "vanilla", "control")
    collapsed_multiple: float = 10.0
    # evaluation and run
    eval_rows: int = 4096
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False

    def __post_init__(self):
        _validate_config(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name: f for f in fields(cls)}
        kw = {}
        for k, v in d.items():
            if k in names:
                kw[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)


def _validate_config(c: TrainConfig) -> None:
    def choice(name, allowed):
        if getattr(c, name) not in allowed:
            raise InputError(f"The '{name}' parameter must be one of {', '.join(map(str, allowed))}. Got {getattr(c, name)!r}.")

    choice("method", METHODS)
    choice("loss", LOSS_CONVENTIONS)
    choice("arch", ("mlp", "conv", "linear"))
    choice("mode", ("cycle", "simultaneous"))
    choice("epoch_unit", ("steps", "epochs"))
    choice("covariance", ("diag", "full"))
    choice("em_backend", ("sklearn", "torch"))
    choice("em_init", ("kmeans", "random"))
    choice("beta_schedule", ("constant", "linear", "warmup"))
    if not (isinstance(c.multiple, (int, float)) and math.isfinite(c.multiple) and c.multiple > 0):
        raise InputError(f"The 'multiple' parameter must be a float > 0. Got {c.multiple}.")
    for name in ("lr", "eps", "collapsed_multiple"):
        v = getattr(c, name)
        if not (math.isfinite(v) and v > 0):
            raise InputError(f"The '{name}' parameter must be a float > 0. Got {v}.")
    for name in ("latent_dim", "batch_size", "epochs", "k", "steps_per_clustering", "epochs_per_round",
                 "refine_cap", "eval_rows", "aggressive_max_inner", "aggressive_check_every"):
        if int(getattr(c, name)) < 1:
            raise InputError(f"The '{name}' parameter must be an integer >= 1. Got {getattr(c, name)}.")
    for name in ("stage3_epochs", "anneal_epochs", "stage3_snapshots"):
        if int(getattr(c, name)) < 0:
            raise InputError(f"The '{name}' parameter must be an integer >= 0. Got {getattr(c, name)}.")
    if not 0 < c.keep_ratio < 1:
        raise InputError(f"The 'keep_ratio' parameter must lie in (0, 1). Got {c.keep_ratio}.")
    for f in fields(c):  # NaN passes every comparison below: --free-bits nan would train without free bits
        v = getattr(c, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise InputError(f"The '{f.name}' parameter must be a finite number. Got {v}.")
    if c.kl_weight < 0 or c.free_bits < 0 or c.beta_start < 0 or c.beta_end < 0:
        raise InputError("The weights kl_weight, free_bits, beta_start and beta_end must be >= 0.")
    bad = [r for r in c.references if r not in ("collapsed", "vanilla", "control")]
    if bad:
        raise InputError(f"Unknown reference(s) {bad}; choose among collapsed, vanilla, control.")
    if c.method == "hct":
        from hcdiag.clusterings import check_r0

        check_r0(c.r0, uneven=c.uneven or c.keep_ratio != 0.5)


PRESETS: dict[str, dict] = {
    # The whole run, references included, within ~90 s on a 2-core CPU (synthetic data).
    "smoke": dict(enc_widths=WIDTH_PRESETS["smoke"][0], dec_widths=WIDTH_PRESETS["smoke"][1], latent_dim=8,
                  batch_size=256, lr=3e-3, epochs=8, r0=16, k=8, em_backend="torch", epochs_per_round=10,
                  steps_per_clustering=16, refine_cap=60, stage3_epochs=30, stage3_snapshots=4, eps=1e-4,
                  eval_rows=2048),
    # The paper's section 5.1 settings with Table 3's architecture, meant for a GPU. R0 = 16 (section
    # 5.5.1; Table 3's 24 is not a power of two) and eps = 1e-4 (Table 3; section 4.2.2 says 1e-5).
    "paper": dict(enc_widths=WIDTH_PRESETS["table3"][0], dec_widths=WIDTH_PRESETS["table3"][1], latent_dim=48,
                  batch_size=512, lr=3e-3, epochs=100, r0=16, k=8, em_backend="torch", epoch_unit="epochs",
                  epochs_per_round=30, refine_cap=100, stage3_epochs=30, stage3_snapshots=6, eps=1e-4,
                  eval_rows=5000),
}


def make_config(preset: str | None = "smoke", **overrides) -> TrainConfig:
    """A config from a preset (``smoke`` or ``paper``) with any field overridden."""
    if preset is not None and preset not in PRESETS:
        raise InputError(f"The 'preset' parameter must be one of {', '.join(PRESETS)}. Got {preset!r}.")
    base = dict(PRESETS.get(preset, {})) if preset else {}
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)


# ----------------------------------------------------------------------------------------------------------
# progress


class Progress:
    """A one-line progress display on a terminal (stage, round, epoch, loss, KL); silent otherwise."""

    def __init__(self, stream=None, enabled: bool | None = None, summaries: bool = True):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if enabled is None else enabled
        self.summaries = summaries
        self._last = 0.0

    def update(self, text: str) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        self.stream.write("\r\033[K" + text[:150])
        self.stream.flush()

    def summary(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        if self.summaries:
            self.stream.write(text + "\n")
            self.stream.flush()


# ----------------------------------------------------------------------------------------------------------
# the trainer


class _NonFinite(Exception):
    def __init__(self, where: str):
        super().__init__(where)
        self.where = where


class Trainer:
    """Runs one configured training of a dataset and writes its run file.

    Parameters
    ----------
    cfg : TrainConfig
    data : hcdiag.data.Dataset (or an array of shape (n, N))
    out : path of the run file, or None to keep it in memory only
    progress : Progress or None
    em_cache : folder of stage-0 EM results shared between runs (see
        :func:`hcdiag.clusterings.fit_clusterings_cached`), or None to fit every time. It changes no
        result: the cached set is the one this run would fit.
    """

    def __init__(self, cfg: TrainConfig, data, out: str | os.PathLike | None = None, *,
                 progress: Progress | None = None, lambda_max: float | None = None,
                 em_cache: str | os.PathLike | None = None):
        from hcdiag.validation import as_data_matrix

        self.cfg = cfg
        self.dataset = data
        x = getattr(data, "x", data)
        x, _ = as_data_matrix(x)
        self.x_np = np.ascontiguousarray(x, dtype=np.float32)
        if not self.x_np.flags.writeable:  # a read-only memmap: torch wants its own copy
            self.x_np = self.x_np.copy()
        self.n, self.N = self.x_np.shape
        if cfg.method == "hct" and cfg.k > self.n:
            raise InputError(f"The 'k' parameter ({cfg.k}) is larger than the number of rows ({self.n}); use k <= {self.n}.")
        self.out = Path(out) if out is not None else None
        self.progress = progress or Progress(enabled=False, summaries=False)
        self.device = resolve_device(cfg.device)
        self._lambda_max = lambda_max
        self.em_cache = em_cache
        self.timings: dict[str, float] = {}
        self._centroid_cache: dict[tuple, tuple] = {}

    # -- set-up -------------------------------------------------------------------------------------------
    def _model_config(self) -> ModelConfig:
        c = self.cfg
        image_shape = None
        shape = getattr(self.dataset, "image_shape", None)
        if c.arch == "conv":
            if not shape:
                raise InputError("The conv architecture needs image data (fashion-mnist, mnist, cifar10, digits); use --arch mlp.")
            image_shape = (1, *shape) if len(shape) == 2 else tuple(shape)
        return ModelConfig(family=c.arch, input_dim=self.N, latent_dim=c.latent_dim, enc_widths=tuple(c.enc_widths),
                           dec_widths=tuple(c.dec_widths), activation=c.activation, image_shape=image_shape,
                           channels=tuple(c.channels))

    def _setup(self) -> None:
        from hcdiag.spectrum import spectrum

        c = self.cfg
        random.seed(c.seed)  # python, numpy and torch: nothing in training draws from them, but user hooks may
        np.random.seed(c.seed % 2**32)
        torch.manual_seed(c.seed)
        if c.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        t0 = time.perf_counter()
        spec = spectrum(self.x_np, top=min(10, self.N))
        self.eigenvalues = np.asarray(spec.eigenvalues, dtype=np.float64)
        self.lambda_max = float(self._lambda_max if self._lambda_max is not None else spec.lambda_max)
        if not self.lambda_max > 0:
            raise InputError("lambda_max of the data is 0 (constant data): decoder variances as multiples of it are undefined.")
        self.timings["spectrum"] = time.perf_counter() - t0
        self.s2 = c.multiple * self.lambda_max
        self.model_cfg = self._model_config()
        self.weights = LossWeights.for_convention(c.loss, self.s2, self.N)
        self.X = torch.from_numpy(self.x_np).to(self.device)
        rng = np.random.default_rng(c.seed)
        m = min(c.eval_rows, self.n)
        self.eval_idx = np.sort(rng.choice(self.n, size=m, replace=False))
        self.eval_x = self.X[torch.from_numpy(self.eval_idx).to(self.device)]
        self.xbar = self.X.double().mean(0)
        self.steps_per_epoch = math.ceil(self.n / c.batch_size)
        self.spc = self.steps_per_epoch if c.epoch_unit == "epochs" else c.steps_per_clustering
        self.fingerprint = _fingerprints(c, self.x_np)

    def _config_dict(self) -> dict:
        import sklearn

        c = self.cfg
        ds = self.dataset.to_dict() if hasattr(self.dataset, "to_dict") else {"name": "array", "n": self.n, "N": self.N}
        return {
            "method": c.method, "train": c.to_dict(), "dataset": ds, "model": self.model_cfg.to_dict(),
            "s2": float(self.s2), "lambda_max": float(self.lambda_max), "multiple": float(c.multiple),
            "loss": c.loss, "beta": Schedule(c.beta_schedule, c.beta_start, c.beta_end).to_dict(),
            "hct": ({"r0": c.r0, "k": c.k, "mode": c.mode, "epoch_unit": c.epoch_unit,
                     "steps_per_clustering": self.spc, "epochs_per_round": c.epochs_per_round,
                     "keep_ratio": c.keep_ratio, "eps": c.eps, "refine_cap": c.refine_cap,
                     "stage3_epochs": c.stage3_epochs, "covariance": c.covariance, "em_backend": c.em_backend}
                    if c.method == "hct" else None),
            "seed": c.seed, "device": str(self.device), "deterministic": c.deterministic,
            "fingerprint": dict(self.fingerprint),
            "versions": {"hcdiag": _version(), "torch": torch.__version__, "numpy": np.__version__,
                         "sklearn": sklearn.__version__, "python": platform.python_version()},
        }

    # -- state -------------------------------------------------------------------------------------------
    def _new_model(self, seed_offset: int = 0):
        return build_model(self.model_cfg, seed=self.cfg.seed + seed_offset, device=self.device)

    def _new_generators(self, seed: int):
        g_idx = torch.Generator(device="cpu").manual_seed(seed)
        g_noise = torch.Generator(device=self.device).manual_seed(seed + 1)
        return g_idx, g_noise

    # -- evaluation (deterministic: xhat = f(mu(x)) on the fixed eval rows) --------------------------------
    def evaluate(self, model) -> dict:
        from hcdiag.metrics import active_units, clustering_losses, kl_per_dim

        mu, lv, xhat = encode_decode(model, self.eval_x)
        out = {"kl": float(kl_per_dim(mu, lv).sum()), "au": int(active_units(mu).count),
               "mse": float(((self.eval_x - xhat) ** 2).mean())}
        if self.centroids is not None:
            # eq. 8 in float64: these values select the kept clusterings and decide refinement (eps down to
            # 1e-6), where float32's ||x||^2 - 2 x.mu + ||mu||^2 cancels away the answer (the training loop's
            # clustering term, a gradient, stays in float32)
            out["losses"] = clustering_losses(xhat.double(), self.centroids.double()).cpu()
        return out

    # -- one optimisation step ---------------------------------------------------------------------------
    def _batch(self, state) -> torch.Tensor:
        perm, pos = state["perm"], state["pos"]
        if perm is None or pos + self.cfg.batch_size > len(perm):
            perm = torch.randperm(self.n, generator=state["g_idx"])
            pos = 0
        idx = perm[pos:pos + self.cfg.batch_size]
        state["perm"], state["pos"] = perm, pos + self.cfg.batch_size
        return self.X[idx.to(self.device)]

    def _cluster_term(self, f: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum over the clusterings ``ids`` of eq. 8 on the batch: ONE matrix product against all their
        centroids (no loop over clusterings, no cdist); equals ``metrics.clustering_losses(...).sum()``.

        The product runs without autograd. Its gradient comes from the chosen centroids in closed form:
        almost everywhere d/df sum_r min_k ||f - mu_rk||^2 = 2 (R f - sum_r mu_r*), which a surrogate with
        that gradient carries, so the backward pass is O(B N) instead of a second (B, R*K) x (R*K, N)
        product and a dense (B, R*K) scatter of the min's gradient."""
        key = (id(self.centroids), tuple(ids.tolist()))
        cached = self._centroid_cache.get(key)
        if cached is None:
            c = self.centroids[ids]  # (R, K, N)
            flat = c.reshape(-1, c.shape[-1]).contiguous()  # (R*K, N)
            offsets = torch.arange(c.shape[0], device=c.device) * c.shape[1]  # (R,)
            cached = (flat, flat.T.contiguous(), flat.pow(2).sum(1), offsets, c.shape[0], c.shape[1])
            self._centroid_cache[key] = cached
        flat, ct, cn, offsets, R, K = cached
        B = f.shape[0]
        fn = f.pow(2).sum(1)  # (B,)
        with torch.no_grad():
            # ||f - mu||^2 = ||f||^2 + (||mu||^2 - 2 f.mu): the min over k needs only the bracket, one fused
            # product (B, R*K); ||f||^2 is added after the min, on (B, R)
            d, k = torch.addmm(cn, f, ct, alpha=-2.0).view(B, R, K).min(2)  # (B, R)
            value = (d + fn[:, None]).clamp_min(0).mean(0).sum()
            # (B, N): the sum over r of each row's nearest centroid, without materialising (B, R, N)
            chosen = torch.nn.functional.embedding_bag(k + offsets, flat, mode="sum")
        surrogate = (R * fn - 2.0 * (f * chosen).sum(1)).mean()
        return value + (surrogate - surrogate.detach())

    def _step(self, model, opt, state, ids: torch.Tensor | None, beta: float, kl_weight: float,
              free_bits: float = 0.0, xb: torch.Tensor | None = None):
        """One step of ``opt`` on the next batch of the run's stream, or on ``xb`` when given (the
        aggressive baseline chooses its own batches). Returns the detached (loss, recon, kl, cluster)."""
        xb = self._batch(state) if xb is None else xb
        mu, lv = model.encode(xb)
        f = model.decode(reparameterize(mu, lv, state["g_noise"]))
        recon = (xb - f).pow(2).sum(1).mean() * self.weights.recon
        kl_d = gaussian_kl(mu, lv)  # (B, n)
        kl = kl_d.sum(1).mean()
        kl_obj = kl_d.mean(0).clamp(min=free_bits).sum() if free_bits > 0 else kl
        loss = recon + kl_weight * kl_obj
        cl = torch.zeros((), device=self.device)
        if ids is not None and beta > 0:
            cl = self._cluster_term(f, ids)
            loss = loss + beta * self.weights.cluster * cl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return torch.stack([loss.detach(), recon.detach(), kl.detach(), cl.detach()])

    def _cycle(self, model, opt, state, active: list[int], beta: float, where: str) -> torch.Tensor:
        """One cycle: ``spc`` steps per active clustering, interleaved (cycle) or all at once (simultaneous)."""
        ids_all = torch.tensor(active, device=self.device)
        terms = []
        if self.cfg.mode == "simultaneous":
            for _ in range(self.spc):
                terms.append(self._step(model, opt, state, ids_all, beta, 1.0))
        else:
            for _ in range(self.spc):
                for i in range(len(active)):
                    terms.append(self._step(model, opt, state, ids_all[i:i + 1], beta, 1.0))
        t = torch.stack(terms)  # (steps, 4)
        self._check_finite(t, where, state)
        state["step"] += len(terms)
        return t.mean(0)

    def _check_finite(self, t: torch.Tensor, where: str, state) -> None:
        finite = torch.isfinite(t[:, 0])
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise _NonFinite(f"{where}, step {state['step'] + bad + 1}")

    # -- history -----------------------------------------------------------------------------------------
    def _record(self, run: dict, model, stage: str, state, terms: torch.Tensor | None) -> dict:
        ev = self.evaluate(model)
        h = run["history"]
        h["step"].append(state["step"])
        h["epoch"].append(state["epoch"])
        h["stage"].append(STAGE_CODES[stage])
        t = terms.tolist() if terms is not None else [float("nan")] * 4
        for key, v in zip(("loss", "recon", "kl_train", "cluster"), t):
            h[key].append(v)
        h["kl"].append(ev["kl"])
        h["au"].append(ev["au"])
        h["losses"].append(ev["losses"])
        self.progress.update(f"{stage} epoch {state['epoch']} loss {t[0]:.4g} KL {ev['kl']:.3f} AU {ev['au']}")
        return ev

    # -- saving ------------------------------------------------------------------------------------------
    def _save(self, run: dict, model, opt, state, position: dict, complete: bool = False) -> None:
        run["status"] = {"complete": complete, "stage": position.get("stage", "done"), "error": None}
        if complete:
            run.pop("resume", None)
        else:
            run["resume"] = {
                "position": dict(position), "model": _cpu_state(model.state_dict()),
                "optimizer": copy.deepcopy(opt.state_dict()) if opt is not None else None,
                "g_idx": state["g_idx"].get_state(), "g_noise": state["g_noise"].get_state().cpu(),
                "perm": state["perm"].clone() if state["perm"] is not None else None, "pos": state["pos"],
                "step": state["step"], "epoch": state["epoch"],
                # rows recorded after this save (up to a non-finite stop) are dropped on --resume
                "history_rows": len(run["history"]["step"]),
            }
        self._write(run)

    def _write(self, run: dict) -> None:
        """Write the run file (atomically); a failed write (a full disk) stops training with one line."""
        if self.out is None:
            return
        from hcdiag.runfile import save_run

        try:
            save_run(_finalize_history(run), self.out)
        except InputError as exc:
            status = run.get("status") or {}
            what = ("Training finished but was not saved" if status.get("complete")
                    else f"Training stopped before stage {status.get('stage')!r}")
            then = ("run the same command with --resume to continue from the last save" if self._has_save
                    else "run the same command again (nothing of this run was saved yet)")
            raise InputError(f"{exc} {what}; once there is room, {then}.") from None
        self._has_save = True

    # -- public entry ------------------------------------------------------------------------------------
    def run(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Train, write the run file at every round and stage, and return the run dict.

        An existing ``out`` is continued with ``resume=True`` (when it was written with the same data and
        settings) or replaced with ``overwrite=True``; without either it is refused, and ``out`` is never
        the data file this run reads. While it trains, ``out`` is locked: a second trainer of the same
        ``out`` is refused (:class:`hcdiag.atomic.OutputLock`)."""
        lock = self._claim_out(resume=resume, overwrite=overwrite) if self.out is not None else None
        try:
            self._setup()
            previous = None
            if resume:
                previous = self._load_for_resume()
            t_start = time.perf_counter()
            try:
                run = self._run(previous)
            except _NonFinite as exc:
                raise NumericalError(self._stop_non_finite(exc.where)) from None
            self.timings["total"] = time.perf_counter() - t_start
            return run
        finally:
            if lock is not None:
                lock.release()

    _last_run: dict | None = None
    _has_save = False  # whether the run file holds a state of this run that --resume continues

    def _claim_out(self, *, resume: bool, overwrite: bool):
        """Refuse an ``out`` that is the input data or that exists without resume/overwrite, then lock
        it. Nothing is written or removed when refusing (the lock file is our own, made and removed)."""
        from hcdiag.atomic import OutputBusy, OutputLock

        out = self.out
        _check_writable(out)
        source = getattr(self.dataset, "source", None)
        if source and out.exists():
            src = Path(source)
            if src.is_file() and os.path.samefile(out, src):  # same inode: hard links and symlinks too
                raise InputError(f"--out {out} is the data file this run reads ({src}); writing the run there would "
                                 "destroy the data: choose another --out.")
            if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
                raise InputError(f"--out {out} is a file in the data folder {src} that this run reads; write the run "
                                 "file outside it (another --out).")
        lock = OutputLock(out, owner="train")
        try:
            lock.acquire()
        except OutputBusy as busy:
            who = f"another hcdiag train (pid {busy.pid})" if busy.pid else "another hcdiag train"
            raise InputError(f"--out {out} is being written by {who}; wait for it to finish or choose another "
                             "--out.") from None
        except OSError as exc:
            raise InputError(f"--out {out}: cannot create its lock file {lock.path} ({exc.strerror}); choose a "
                             "writable folder.") from None
        if out.exists() and not resume and not overwrite:
            lock.release()
            raise InputError(f"--out {out} already exists; pass --resume to continue it, --overwrite to replace it, "
                             "or choose another --out.")
        return lock

    def _stop_non_finite(self, where: str) -> str:
        """The message of a non-finite loss at ``where`` (stage, round, epoch, step), after writing what the
        run has so far as a partial run file (status.complete False, the message in status.error)."""
        run, out = self._last_run, self.out
        cure = "Lower --lr or change --multiple/--loss."
        if run is None or out is None:
            return f"non-finite loss in {where}; nothing was written (no run file). {cure}"
        what = ("" if "resume" in run else " (the stage-0 clusterings and the initial model; --resume starts "
                "over from them)")
        msg = (f"non-finite loss in {where}; the last good state{what} is kept in {out} as a partial run "
               f"(hcdiag check-barrier --partial {out}). {cure}")
        stage = run["resume"]["position"].get("stage", "stage1") if "resume" in run else (
            "stage1" if self.cfg.method == "hct" else "baseline")
        run["status"] = {"complete": False, "stage": stage, "error": msg}
        from hcdiag.runfile import save_run

        try:
            save_run(_finalize_history(run), out)
        except InputError as exc:
            return f"non-finite loss in {where}; the partial run could not be written either ({exc}). {cure}"
        return msg

    def _load_for_resume(self) -> dict | None:
        from hcdiag.runfile import load_run

        if self.out is None or not self.out.exists():
            return None  # nothing to resume: start fresh
        prev = load_run(self.out, partial=True).data
        prev.setdefault("config", {})
        self._check_same_data(prev)
        mine = self._config_dict()
        diff = _config_diff(prev["config"], mine)
        if prev["config"].get("fingerprint"):  # the same data, fingerprinted: where it was read from is moot
            diff = [d for d in diff if d != "dataset.source"]
        stored = (prev["config"].get("fingerprint") or {}).get("settings")
        if not diff and stored is not None and stored != self.fingerprint["settings"]:
            # a change _config_diff's rounding hides (a float below 1e-12): name it exactly
            old = prev["config"].get("train") or {}
            diff = [f"train.{k}" for k in sorted(set(old) | set(mine["train"]))
                    if k != "device" and old.get(k) != mine["train"].get(k)] or ["fingerprint.settings"]
        if diff:
            raise InputError(f"--resume: {self.out} was written with another config (keys differ: {', '.join(diff)}); "
                             "use the same flags or another --out.")
        prev["config"]["fingerprint"] = self.fingerprint
        if prev.get("status", {}).get("complete", True) and "resume" not in prev:
            return {"complete": prev}
        return prev

    def _check_same_data(self, prev: dict) -> None:
        """Refuse to resume a run trained on other data (a negated or permuted copy included).

        Run files keep ``config.fingerprint.data`` (:func:`hcdiag.clusterings.fingerprint` of the float32
        data). Decision for run files written before fingerprints existed: they are resumed, with a
        warning, when their stored evaluation rows and data mean equal this data's (rows drawn by the
        same seed, so a negated or permuted data set differs there), and refused otherwise. The
        fingerprint is added at the next save. Refusing them outright would throw away the partial runs
        of an interrupted ``hcdiag verify`` grid, which resumes its runs."""
        stored = (prev["config"].get("fingerprint") or {}).get("data")
        if stored == self.fingerprint["data"]:
            return
        ev = prev.get("eval") or {}
        ex, xbar, rows_at = ev.get("x"), ev.get("xbar"), ev.get("rows")
        old_n, old_N = (prev["config"].get("dataset") or {}).get("n"), None
        if isinstance(ex, torch.Tensor) and ex.ndim == 2:
            old_N = int(ex.shape[1])
        mine_x = self.eval_x.cpu()
        same_rows = (isinstance(rows_at, torch.Tensor) and isinstance(ex, torch.Tensor) and ex.shape == mine_x.shape
                     and np.array_equal(rows_at.cpu().numpy(), self.eval_idx))
        if old_N is not None and (old_N != self.N or (old_n is not None and int(old_n) != self.n)):
            what = f"it had {old_n if old_n is not None else '?'} rows x {old_N} columns, this data {self.n} x {self.N}"
        elif not same_rows:  # its evaluation rows were drawn with another seed or count: nothing to compare
            if stored is None:
                return  # an unfingerprinted file: the config check names the setting (seed, eval_rows)
            what = f"same shape {self.n} x {self.N}, other values"
        else:
            rows = int((ex.to(mine_x.dtype) != mine_x).any(1).sum())
            same_mean = isinstance(xbar, torch.Tensor) and xbar.shape == self.xbar.shape and torch.allclose(
                xbar.double(), self.xbar.double().cpu(), rtol=1e-6, atol=1e-6 * float(self.xbar.abs().max()))
            if stored is None and rows == 0 and same_mean:
                import warnings

                from hcdiag.errors import HcdiagWarning

                warnings.warn(f"--resume: {self.out} has no data fingerprint (written by an earlier hcdiag); its "
                              f"{len(mine_x)} evaluation rows and data mean match this data, so it is resumed.",
                              HcdiagWarning, stacklevel=2)
                return
            what = (f"same shape {self.n} x {self.N}, other values: {rows} of its {len(mine_x)} evaluation rows differ"
                    if rows else f"same shape {self.n} x {self.N} and evaluation rows, other values elsewhere")
        raise InputError(f"--resume: {self.out} was trained on other data ({what}); resume with the data it was "
                         "trained on, or start a new run with another --out (or --overwrite).")

    def _run(self, previous: dict | None) -> dict:
        c = self.cfg
        if previous is not None and "complete" in previous:
            self.progress.summary(f"{self.out} is already complete; nothing to resume.")
            return previous["complete"]
        # stage 0: clusterings (all methods: the memory curves of baselines use them too)
        if previous is not None and "resume" in previous:
            run, self._has_save = previous, True
            h = _history_lists(run.get("history") or {})
            rows = _saved_rows(h, run["resume"])
            run["history"] = {k: v[:rows] for k, v in h.items()}  # no row twice after a non-finite stop
            self.centroids = run["clusterings"]["centroids"].to(self.device).float()
        elif previous is not None:  # stopped before its first save: start over from its clusterings
            run = self._new_run(previous["clusterings"])
        else:
            run = self._new_run()
        self._last_run = run
        if c.method == "hct":
            self._train_hct(run)
        else:
            self._train_baseline(run)
        self._train_references(run)
        run["status"] = {"complete": True, "stage": "done", "error": None}
        run.pop("resume", None)
        run["timings"] = {k: float(v) for k, v in self.timings.items()}
        self._write(run)
        return _finalize_history(run)

    def _fit_clusterings(self) -> dict:
        from hcdiag.clusterings import fit_clusterings, fit_clusterings_cached

        c = self.cfg
        t0 = time.perf_counter()
        self.progress.update(f"stage 0: EM x{c.r0} (k={c.k}, {c.covariance}, {c.em_backend})")
        em = dict(covariance=c.covariance, backend=c.em_backend, init=c.em_init, seed=c.seed, device=self.device,
                  uneven=c.uneven or c.keep_ratio != 0.5)
        hit = False
        if self.em_cache is not None:
            cs, hit = fit_clusterings_cached(self.em_cache, self.x_np, c.r0, c.k, **em)
        else:
            cs = fit_clusterings(self.x_np, c.r0, c.k, **em)
        self.timings["stage0_em"] = time.perf_counter() - t0
        self.progress.summary(f"stage 0: {c.r0} EM runs {'read from the cache' if hit else 'fitted'} in "
                              f"{self.timings['stage0_em']:.1f} s, mean log-lik {float(np.mean(cs.loglik)):.4g}")
        clusterings = {
            "centroids": torch.as_tensor(cs.centroids, dtype=torch.float32),
            "weights": torch.as_tensor(cs.weights, dtype=torch.float32),
            "seeds": torch.as_tensor(cs.seeds, dtype=torch.int64),
            "loglik": torch.as_tensor(cs.loglik, dtype=torch.float64),
            "covariance_type": cs.covariance_type,
            "resp": torch.as_tensor(cs.responsibilities(self.eval_x.cpu().numpy()), dtype=torch.float32),
        }
        if cs.covariances is not None:
            clusterings["covariances"] = torch.as_tensor(cs.covariances, dtype=torch.float32)
        return clusterings

    def _new_run(self, clusterings: dict | None = None) -> dict:
        """A fresh run dict: stage 0's clusterings fitted (or ``clusterings`` of an earlier try of this
        run, the same fit), nothing trained yet."""
        if clusterings is None:
            clusterings = self._fit_clusterings()
        self.centroids = clusterings["centroids"].to(self.device).float()
        return {
            "format": "hcdiag-run", "version": 1,
            "config": self._config_dict(),
            "eval": {"x": self.eval_x.cpu(), "xbar": self.xbar.float().cpu(),
                     "eigenvalues": torch.as_tensor(self.eigenvalues), "rows": torch.as_tensor(self.eval_idx)},
            "clusterings": clusterings,
            "rounds": [], "refinement": None, "stage3": None,
            "history": {k: [] for k in ("step", "epoch", "stage", "loss", "recon", "kl_train", "cluster", "kl", "au", "losses")},
            "snapshots": {}, "snapshot_order": [], "references": {},
        }

    def _snapshot(self, run: dict, model, name: str) -> None:
        run["snapshots"][name] = _cpu_state(model.state_dict())
        if name not in run["snapshot_order"]:
            run["snapshot_order"].append(name)

    def _restore(self, run: dict, model, opt) -> dict:
        r = run["resume"]
        model.load_state_dict(r["model"])
        if opt is not None and r["optimizer"] is not None:
            opt.load_state_dict(r["optimizer"])
        g_idx, g_noise = self._new_generators(self.cfg.seed)
        g_idx.set_state(r["g_idx"])
        g_noise.set_state(r["g_noise"].to(g_noise.get_state().device))
        return {"g_idx": g_idx, "g_noise": g_noise, "perm": r["perm"], "pos": int(r["pos"]),
                "step": int(r["step"]), "epoch": int(r["epoch"])}

    # -- Historical Consensus ----------------------------------------------------------------------------
    def _train_hct(self, run: dict) -> None:
        c = self.cfg
        model = self._new_model()
        opt = torch.optim.Adam(model.parameters(), lr=c.lr)
        R0 = self.centroids.shape[0]
        n_rounds = _n_rounds(R0, c.keep_ratio)
        beta = Schedule(c.beta_schedule, c.beta_start, c.beta_end)
        stage1_cycles = max(1, n_rounds * c.epochs_per_round)
        if "resume" in run:
            state = self._restore(run, model, opt)
            pos = run["resume"]["position"]
        else:
            g_idx, g_noise = self._new_generators(c.seed)
            state = {"g_idx": g_idx, "g_noise": g_noise, "perm": None, "pos": 0, "step": 0, "epoch": 0}
            self._snapshot(run, model, "init")
            self._record(run, model, "stage1", state, None)
            pos = {"stage": "stage1", "round": 0}
        active = list(range(R0)) if not run["rounds"] else [int(i) for i in run["rounds"][-1]["kept"]]

        # stage 1: rounds
        t0 = time.perf_counter()
        while pos["stage"] == "stage1":
            t = len(run["rounds"])
            if len(active) <= 2:
                pos = {"stage": "stage2"}
                break
            for e in range(c.epochs_per_round):
                b = beta.value(state["epoch"] / stage1_cycles)
                terms = self._cycle(model, opt, state, active, b, f"stage 1, round {t}, epoch {e + 1}")
                state["epoch"] += 1
                ev = self._record(run, model, "stage1", state, terms)
            losses = ev["losses"]  # (R0,) float64, l_C of every clustering at Theta_t
            n_keep = _n_keep(len(active), c.keep_ratio)
            # ties broken deterministically by id: stable sort on (loss, id)
            order = sorted(active, key=lambda i: (float(losses[i]), i))
            kept = sorted(order[:n_keep])
            eps_t = max(float(losses[i]) for i in kept)
            self._snapshot(run, model, f"round{t}")
            run["rounds"].append({"round": t, "active": torch.tensor(active), "kept": torch.tensor(kept),
                                  "losses": losses.clone(), "eps": eps_t, "snapshot": f"round{t}",
                                  "beta": float(beta.value(state["epoch"] / stage1_cycles))})
            self.progress.summary(f"round {t}: {len(active)} -> {len(kept)} clusterings kept {kept}, eps_t={eps_t:.4g}, "
                                  f"KL={ev['kl']:.3f}, AU={ev['au']}, MSE={ev['mse']:.4g}")
            active = kept
            pos = {"stage": "stage1" if len(active) > 2 else "stage2"}
            self._save(run, model, opt, state, pos)
        self.timings["stage1"] = self.timings.get("stage1", 0.0) + time.perf_counter() - t0

        # stage 2: refinement on the final pair
        t0 = time.perf_counter()
        b_end = beta.value(1.0)
        pair = active
        if pos["stage"] == "stage2":
            hist = []
            reached = False
            ev = self.evaluate(model)
            for e in range(c.refine_cap):
                la, lb = float(ev["losses"][pair[0]]), float(ev["losses"][pair[1]])
                if max(la, lb) < c.eps:
                    reached = True
                    break
                terms = self._cycle(model, opt, state, pair, b_end, f"stage 2 (refinement), epoch {e + 1}")
                state["epoch"] += 1
                ev = self._record(run, model, "stage2", state, terms)
                hist.append([float(ev["losses"][pair[0]]), float(ev["losses"][pair[1]])])
            la, lb = float(ev["losses"][pair[0]]), float(ev["losses"][pair[1]])
            reached = reached or max(la, lb) < c.eps
            self._snapshot(run, model, "refined")
            run["refinement"] = {"pair": torch.tensor(pair), "reached": bool(reached), "eps": float(c.eps),
                                 "eps_T": max(la, lb), "epochs": len(hist),
                                 "losses": torch.tensor(hist, dtype=torch.float64).reshape(-1, 2),
                                 "snapshot": "refined", "beta": float(b_end), "step": int(state["step"])}
            self.progress.summary(f"refinement on {pair}: {len(hist)} epochs, eps_T={max(la, lb):.4g} "
                                  f"({'reached' if reached else 'NOT reached'} eps={c.eps:g}), KL={ev['kl']:.3f}, AU={ev['au']}")
            pos = {"stage": "stage3"}
            self._save(run, model, opt, state, pos)
        self.timings["stage2"] = self.timings.get("stage2", 0.0) + time.perf_counter() - t0

        # stage 3: one clustering only
        t0 = time.perf_counter()
        if pos["stage"] == "stage3":
            a = int(run["refinement"]["pair"][0])
            marks = _snapshot_marks(c.stage3_epochs, c.stage3_snapshots)
            names = []
            for e in range(c.stage3_epochs):
                terms = self._cycle(model, opt, state, [a], b_end, f"stage 3 (single clustering {a}), epoch {e + 1}")
                state["epoch"] += 1
                ev = self._record(run, model, "stage3", state, terms)
                if e + 1 in marks:
                    name = f"stage3_{len(names)}"
                    names.append(name)
                    self._snapshot(run, model, name)
            self._snapshot(run, model, "final")
            ev = self.evaluate(model)
            run["stage3"] = {"clustering": a, "epochs": c.stage3_epochs, "snapshots": names}
            self.progress.summary(f"stage 3 on clustering {a}: {c.stage3_epochs} epochs, KL={ev['kl']:.3f}, "
                                  f"AU={ev['au']}, l_a={float(ev['losses'][a]):.4g}")
            pos = {"stage": "references", "done": []}
            self._save(run, model, None, state, pos)
        self.timings["stage3"] = self.timings.get("stage3", 0.0) + time.perf_counter() - t0

    # -- baselines ---------------------------------------------------------------------------------------
    def _train_baseline(self, run: dict) -> None:
        c = self.cfg
        model = self._new_model()
        if "resume" in run and run["resume"]["position"].get("stage") == "references":
            return
        t0 = time.perf_counter()
        state, snaps = self._train_vae(model, c.method, c.epochs, run=run, stage="baseline")
        self.timings["baseline"] = time.perf_counter() - t0
        for name, sd in snaps:
            run["snapshots"][name] = sd
            run["snapshot_order"].append(name)
        self._save(run, model, None, state, {"stage": "references", "done": []})

    def _train_vae(self, model, method: str, epochs: int, *, run: dict | None, stage: str, s2_weights=None,
                   seed_offset: int = 0):
        """Plain VAE training for ``epochs`` data epochs (vanilla and the baselines). Returns the state and
        the snapshots (init, evenly spaced epochs, final).

        ``aggressive`` follows He et al. 2019 (their text.py/image.py): one Adam for the encoder and one for
        the decoder for the whole run. While aggressive mode is on, each training batch gets the encoder
        inner loop (:meth:`_aggressive_inner`) and then ONE decoder-only step on that batch; at the end of
        every such epoch the MI on the eval rows is estimated and aggressive mode ends for good once it
        drops below the previous epoch's (starting from 0, as ``pre_mi = 0`` there). Afterwards both
        optimizers step together, keeping their Adam moments. Recorded in ``run``: ``history.inner_steps``
        (encoder steps per decoder step, mean per epoch) and ``aggressive`` (``ended_epoch``, ``mi``)."""
        c = self.cfg
        weights = s2_weights or self.weights
        saved_w, self.weights = self.weights, weights
        g_idx, g_noise = self._new_generators(c.seed + 1000 * seed_offset)
        state = {"g_idx": g_idx, "g_noise": g_noise, "perm": None, "pos": 0, "step": 0, "epoch": 0}
        snaps = [("init", _cpu_state(model.state_dict()))]
        marks = _snapshot_marks(epochs, c.baseline_snapshots)
        aggressive = method == "aggressive"
        if run is not None:
            self._record(run, model, stage, state, None)
            if aggressive:  # rows before the first epoch (the init row) have no inner loop
                run["history"]["inner_steps"] = [math.nan] * len(run["history"]["step"])
        if aggressive:
            enc_params = [p for n, p in model.named_parameters() if n.startswith(("encoder", "enc_"))]
            dec_params = [p for n, p in model.named_parameters() if not n.startswith(("encoder", "enc_"))]
            enc_opt, dec_opt = torch.optim.Adam(enc_params, lr=c.lr), torch.optim.Adam(dec_params, lr=c.lr)
            opt = _Joint(enc_opt, dec_opt)  # after aggressive mode: both step, as He et al.'s vanilla phase
        else:
            opt = torch.optim.Adam(model.parameters(), lr=c.lr)
        last_mi, mis, ended = 0.0, [], None
        try:
            for e in range(epochs):
                klw = {"beta": c.kl_weight, "anneal": min(1.0, (e + 1) / max(1, c.anneal_epochs))}.get(method, 1.0)
                fb = c.free_bits if method == "freebits" else 0.0
                terms, inner = [], []
                for _ in range(self.steps_per_epoch):
                    if aggressive:
                        xb = self._batch(state)
                        inner.append(self._aggressive_inner(model, enc_opt, state, xb))
                        terms.append(self._step(model, dec_opt, state, None, 0.0, 1.0, xb=xb))
                    else:
                        terms.append(self._step(model, opt, state, None, 0.0, klw, free_bits=fb))
                t = torch.stack(terms)
                self._check_finite(t, f"{stage} ({method}), epoch {e + 1}", state)
                state["step"] += len(terms)
                state["epoch"] += 1
                if run is not None:
                    self._record(run, model, stage, state, t.mean(0))
                    if method == "aggressive":
                        run["history"]["inner_steps"].append(float(np.mean(inner)) if inner else 0.0)
                if aggressive:
                    from hcdiag.metrics import mutual_information

                    mu, lv, _ = encode_decode(model, self.eval_x)
                    mi = float(mutual_information(mu, lv, seed=c.seed))
                    mis.append(mi)
                    if mi - last_mi < 0:  # He et al.: `if cur_mi - pre_mi < 0: aggressive_flag = False`
                        aggressive, ended = False, e + 1
                        self.progress.summary(f"aggressive: MI fell from {last_mi:.4f} to {mi:.4f} nats after epoch "
                                              f"{e + 1}; encoder inner loop off, encoder and decoder step together")
                    last_mi = mi
                if e + 1 in marks and e + 1 < epochs:
                    snaps.append((f"epoch{e + 1}", _cpu_state(model.state_dict())))
        finally:
            self.weights = saved_w
        if run is not None and method == "aggressive":
            run["aggressive"] = {"ended_epoch": ended, "mi": torch.tensor(mis, dtype=torch.float64)}
        snaps.append(("final", _cpu_state(model.state_dict())))
        return state, snaps

    def _aggressive_inner(self, model, enc_opt, state, xb: torch.Tensor) -> int:
        """He et al. 2019's inner loop before one decoder step; returns the number of encoder steps taken.

        Encoder-only steps of the full VAE loss (KL weight 1): the first on the current batch ``xb``, each
        later one on a random batch (a uniformly drawn batch slot of the current permutation, drawn with
        the run's index generator, so runs are reproducible). After every ``aggressive_check_every`` steps
        the mean loss of that block is compared with the previous block's (the first with +inf, their
        ``burn_pre_loss = 1e4`` sentinel) and the loop stops if it rose (``burn_pre_loss - burn_cur_loss <
        0``); it stops in any case after ``aggressive_max_inner`` steps. All batches have ``batch_size``
        rows, so the mean of per-batch mean losses is their per-example mean."""
        c = self.cfg
        bs, every = c.batch_size, c.aggressive_check_every
        slots = max(1, self.n // bs)  # full batches in a permutation, as _batch serves them
        pre, block = math.inf, []
        for i in range(1, c.aggressive_max_inner + 1):
            if i > 1:
                j = int(torch.randint(slots, (1,), generator=state["g_idx"]))
                xb = self.X[state["perm"][j * bs:(j + 1) * bs].to(self.device)]
            block.append(self._step(model, enc_opt, state, None, 0.0, 1.0, xb=xb)[0])
            if i % every == 0:
                cur = float(torch.stack(block).mean())
                if pre - cur < 0:
                    return i
                pre, block = cur, []
        return c.aggressive_max_inner

    # -- references ---------------------------------------------------------------------------------------
    def _train_references(self, run: dict) -> None:
        c = self.cfg
        wanted = [r for r in c.references if c.method == "hct" or r == "collapsed"]
        done = set(run.get("references", {}))
        t0 = time.perf_counter()
        for name in wanted:
            if name in done:
                continue
            extra = {}
            if name == "collapsed":  # paper 5.3: vanilla VAE at s2 = 10 lambda_max, same architecture and init
                s2 = c.collapsed_multiple * self.lambda_max
                model = self._new_model()
                w = LossWeights.for_convention(c.loss, s2, self.N)
                self._train_vae(model, "vanilla", c.epochs, run=None, stage="reference", s2_weights=w, seed_offset=1)
                rcfg = {"method": "vanilla", "s2": s2, "multiple": c.collapsed_multiple, "epochs": c.epochs}
            elif name == "vanilla":
                model = self._new_model()
                _, snaps = self._train_vae(model, "vanilla", c.epochs, run=None, stage="reference", seed_offset=2)
                rcfg = {"method": "vanilla", "s2": self.s2, "multiple": c.multiple, "epochs": c.epochs}
                extra = {"snapshots": dict(snaps), "snapshot_order": [n for n, _ in snaps]}
            else:  # control: no history, trained from scratch on the final pair only, same step budget
                if run.get("refinement") is None:
                    continue
                pair = [int(i) for i in run["refinement"]["pair"]]
                model = self._new_model()
                opt = torch.optim.Adam(model.parameters(), lr=c.lr)
                g_idx, g_noise = self._new_generators(c.seed + 3000)
                state = {"g_idx": g_idx, "g_noise": g_noise, "perm": None, "pos": 0, "step": 0, "epoch": 0}
                budget = max(1, int(run["refinement"]["step"]))  # the steps of stages 1 and 2
                b_end = Schedule(c.beta_schedule, c.beta_start, c.beta_end).value(1.0)
                while state["step"] < budget:
                    self._cycle(model, opt, state, pair, b_end, "reference (control), epoch %d" % (state["epoch"] + 1))
                    state["epoch"] += 1
                rcfg = {"method": "hct-control", "s2": self.s2, "multiple": c.multiple, "pair": pair,
                        "steps": state["step"]}
            ev = self.evaluate(model)
            rcfg["model"] = self.model_cfg.to_dict()
            run["references"][name] = {"config": rcfg, "state": _cpu_state(model.state_dict()),
                                       "metrics": {"kl": ev["kl"], "au": ev["au"], "mse": ev["mse"]}, **extra}
            self.progress.summary(f"reference {name}: KL={ev['kl']:.4f}, AU={ev['au']}, MSE={ev['mse']:.4g}")
            self._save(run, model, None, {"g_idx": torch.Generator(), "g_noise": torch.Generator(), "perm": None,
                                          "pos": 0, "step": 0, "epoch": 0},
                       {"stage": "references", "done": sorted(run["references"])})
        self.timings["references"] = self.timings.get("references", 0.0) + time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# helpers


class _Joint:
    """Several optimizers zeroed and stepped as one: the aggressive baseline's encoder and decoder Adam
    after aggressive mode (He et al. 2019 keep both, so each keeps its moments and step count)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()


def _n_keep(n_active: int, ratio: float) -> int:
    """How many of ``n_active`` clusterings a round keeps: ``ratio`` of them, at least 2, strictly fewer."""
    return max(2, min(n_active - 1, int(round(n_active * ratio))))


def _n_rounds(r0: int, ratio: float) -> int:
    n, t = r0, 0
    while n > 2:
        n = _n_keep(n, ratio)
        t += 1
    return t


def _snapshot_marks(epochs: int, count: int) -> set[int]:
    """Epoch numbers (1-based) at which to snapshot: ``count`` evenly spaced, the last one included."""
    if epochs <= 0 or count <= 0:
        return set()
    return {max(1, round(epochs * (i + 1) / count)) for i in range(count)}


def _cpu_state(sd: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def _finalize_history(run: dict) -> dict:
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


def _history_lists(h: dict) -> dict:
    """The stored history (tensors) back to lists that training appends to (on resume)."""
    keys = ("step", "epoch", "stage", "loss", "recon", "kl_train", "cluster", "kl", "au", "losses")
    out = {k: [] for k in keys}
    for k in keys:
        v = h.get(k)
        if v is None:
            continue
        out[k] = list(v.unbind(0)) if k == "losses" else (v.tolist() if isinstance(v, torch.Tensor) else list(v))
    inner = h.get("inner_steps")  # the aggressive baseline's series, absent elsewhere
    if inner is not None:
        out["inner_steps"] = inner.tolist() if isinstance(inner, torch.Tensor) else list(inner)
    return out


def _fingerprints(c: TrainConfig, x: np.ndarray) -> dict:
    """``config.fingerprint`` of a run file: SHA-256 of the float32 data (shape and bytes) and of every
    setting but the device (:func:`hcdiag.clusterings.fingerprint`, the EM cache's hash). --resume refuses
    a run whose fingerprints differ from the command's."""
    from hcdiag.clusterings import fingerprint

    settings = {k: v for k, v in c.to_dict().items() if k != "device"}
    return {"data": fingerprint(x), "settings": fingerprint(settings=settings)}


def _saved_rows(h: dict, resume: dict) -> int:
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


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    ignore = {"versions", "device", "fingerprint"}  # fingerprints are compared on their own, first
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += _config_diff(va, vb, f"{prefix}{k}.")
        elif _norm(va) != _norm(vb):
            diffs.append(f"{prefix}{k}")
    return diffs


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float):
        return round(v, 12)
    return v


def _check_writable(path: Path) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and path.is_dir():
        raise InputError(f"--out {path} is a directory; give a file name such as {path / 'run.pt'}.")
    if not folder.exists():
        raise InputError(f"--out {path}: the folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--out {path}: the folder {folder} is not writable; choose another --out.")


def _version() -> str:
    from hcdiag import __version__

    return __version__


def train(data, cfg: TrainConfig | None = None, out=None, *, resume: bool = False, overwrite: bool = False,
          progress: Progress | None = None, **overrides) -> dict:
    """Train ``data`` with ``cfg`` (or the smoke preset plus ``overrides``) and return the run dict."""
    cfg = cfg if cfg is not None else make_config("smoke", **overrides)
    if cfg is not None and overrides:
        cfg = replace(cfg, **overrides)
    return Trainer(cfg, data, out, progress=progress).run(resume=resume, overwrite=overwrite)
