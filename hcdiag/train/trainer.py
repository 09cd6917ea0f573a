"""The trainer core: one run from data and config to run file, whatever the method.

It owns seeding, the device, the data and its evaluation rows, stage 0 (the EM clusterings), the run's
skeleton, checkpoint/resume (through :class:`~hcdiag.train.writer.RunWriter`) and non-finite stops; the
method (:data:`hcdiag.train.methods.METHODS`) trains the main model through ``self.loop`` and
``self.writer``; then the references are trained (:mod:`hcdiag.train.references`).
"""

from __future__ import annotations

import os
import platform
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from hcdiag.device import resolve_device
from hcdiag.errors import HcdiagWarning, InputError, NumericalError, flag, marked, render
from hcdiag.losses import LossWeights, Schedule
from hcdiag.models import ModelConfig, build_model
from hcdiag.train import guard
from hcdiag.train.config import TrainConfig
from hcdiag.train.loop import Loop, NonFinite
from hcdiag.train.methods import get_method
from hcdiag.train.progress import Progress
from hcdiag.train.references import train_references
from hcdiag.train.writer import HISTORY_KEYS, RunWriter, finalize_history, history_lists, saved_rows


RESUME_FORMAT = 2


class Trainer:
    """Runs one configured training of a dataset and writes its run file.

    Parameters
    ----------
    cfg : TrainConfig
    data : hcdiag.data.Dataset (or an array of shape (n, N))
    out : path of the run file, or None to keep it in memory only
    progress : Progress or None
    lambda_max : the decoder variance's unit (default: the data's top covariance eigenvalue)
    em_cache : folder of stage-0 EM results shared between runs (see
        :func:`hcdiag.clusterings.fit_clusterings_cached`), or None to fit every time. It changes no
        result: the cached set is the one this run would fit.
    ref_cache : folder of references (the collapsed model, the vanilla reference) shared between runs
        (:mod:`hcdiag.train.refcache`), or None to train them every time. It changes no result either.
    checkpoint_seconds : a baseline saves its run file after an epoch once this many seconds have passed since
        its last save, so ``--resume`` continues from there (bitwise); HCT saves after every round and stage.

    After :meth:`setup`, ``loop`` holds the data stream and steps (:class:`~hcdiag.train.loop.Loop`).
    """

    def __init__(self, cfg: TrainConfig, data, out: str | os.PathLike | None = None, *,
                 progress: Progress | None = None, lambda_max: float | None = None,
                 em_cache: str | os.PathLike | None = None, ref_cache: str | os.PathLike | None = None,
                 checkpoint_seconds: float = 60.0):
        from hcdiag.validation import as_data_matrix

        self.cfg = cfg
        self.method = get_method(cfg.method)
        self.dataset = data
        x = getattr(data, "x", data)
        x, _ = as_data_matrix(x)
        self.x_np = np.ascontiguousarray(x, dtype=np.float32)
        if not self.x_np.flags.writeable:  # a read-only memmap: torch wants its own copy
            self.x_np = self.x_np.copy()
        self.n, self.N = self.x_np.shape
        if self.method.pipeline and cfg.k > self.n:
            raise InputError(f"The 'k' parameter ({cfg.k}) is larger than the number of rows ({self.n}); use k <= {self.n}.")
        self.out = Path(out) if out is not None else None
        self.progress = progress or Progress(enabled=False, summaries=False)
        self.device = resolve_device(cfg.device)
        self._lambda_max = lambda_max
        self.em_cache = em_cache
        self.ref_cache = ref_cache
        self.timings: dict[str, float] = {}
        self.checkpoint_seconds = float(checkpoint_seconds)
        self.loop: Loop | None = None
        self.writer: RunWriter | None = None

    # -- set-up -------------------------------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        """The architecture ``cfg`` asks for on this data (conv needs image data)."""
        c = self.cfg
        image_shape = None
        shape = getattr(self.dataset, "image_shape", None)
        if c.arch == "conv":
            if not shape:
                raise InputError("The conv architecture needs image data (fashion-mnist, mnist, cifar10, digits); use "
                                 + flag("--arch mlp", "arch='mlp'") + ".")
            image_shape = (1, *shape) if len(shape) == 2 else tuple(shape)
        return ModelConfig(family=c.arch, input_dim=self.N, latent_dim=c.latent_dim, enc_widths=tuple(c.enc_widths),
                           dec_widths=tuple(c.dec_widths), activation=c.activation, image_shape=image_shape,
                           channels=tuple(c.channels))

    def setup(self) -> None:
        """Seeds, the spectrum (lambda_max, s2), the model config, the data on the device, the evaluation
        rows and the step loop."""
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
        self.model_cfg = self.model_config()
        X = torch.from_numpy(self.x_np).to(self.device)
        rng = np.random.default_rng(c.seed)
        self.eval_idx = np.sort(rng.choice(self.n, size=min(c.eval_rows, self.n), replace=False))
        self.eval_x = X[torch.from_numpy(self.eval_idx).to(self.device)]
        self.xbar = X.double().mean(0)
        steps_per_epoch = -(-self.n // c.batch_size)
        self.loop = Loop(X, self.eval_x, LossWeights.for_convention(c.loss, self.s2, self.N), batch_size=c.batch_size,
                         spc=steps_per_epoch if c.epoch_unit == "epochs" else c.steps_per_clustering, mode=c.mode,
                         device=self.device, unit=c.epoch_unit)
        if self.method.pipeline and c.epoch_unit == "data_pass" and c.mode == "cycle" \
                and c.epochs_per_round * steps_per_epoch < c.r0:
            warnings.warn(HcdiagWarning(
                f"With epoch_unit data_pass a round trains epochs_per_round x steps per epoch = "
                f"{c.epochs_per_round} x {steps_per_epoch} steps ({self.n} rows, batch {c.batch_size}), fewer than the "
                f"R0 = {c.r0} clusterings: some get no step of their own before the round keeps the best (their l_C "
                f"is still measured); for every clustering to train, use a smaller "
                f"{flag('--batch-size', 'batch_size')}, more {flag('--epochs-per-round', 'epochs_per_round')} or "
                f"another {flag('--epoch-unit', 'epoch_unit')}."), stacklevel=2)
        self.fingerprint = guard.fingerprints(c, self.x_np)

    def config_dict(self) -> dict:
        """``config`` of the run file: the settings, the data, the model, s2, and library versions."""
        import sklearn

        from hcdiag import __version__

        c = self.cfg
        ds = self.dataset.to_dict() if hasattr(self.dataset, "to_dict") else {"name": "array", "n": self.n, "N": self.N}
        return {
            "method": c.method, "train": c.to_dict(), "dataset": ds, "model": self.model_cfg.to_dict(),
            "s2": float(self.s2), "lambda_max": float(self.lambda_max), "multiple": float(c.multiple),
            "loss": c.loss, "beta": Schedule(c.beta_schedule, c.beta_start, c.beta_end).to_dict(),
            "hct": ({"r0": c.r0, "k": c.k, "mode": c.mode, "epoch_unit": c.epoch_unit,
                     "steps_per_clustering": None if c.epoch_unit == "data_pass" else self.loop.spc,
                     "steps_per_epoch": self.loop.steps_per_epoch, "epochs_per_round": c.epochs_per_round,
                     "keep_ratio": c.keep_ratio, "eps": c.eps, "refine_cap": c.refine_cap,
                     "stage3_epochs": c.stage3_epochs, "covariance": c.covariance, "em_backend": c.em_backend}
                    if self.method.pipeline else None),
            "seed": c.seed, "device": str(self.device), "deterministic": c.deterministic,
            # 2: baselines save checkpoints during training (hcdiag.train.methods.vae.train_vae); an hcdiag that
            # predates them would resume such a file by training from scratch onto its rows, and refuses it instead
            # (its config has no such key: "written with another config")
            "resume_format": RESUME_FORMAT,
            "fingerprint": dict(self.fingerprint),
            "versions": {"hcdiag": __version__, "torch": str(torch.__version__), "numpy": np.__version__,
                         "sklearn": sklearn.__version__, "python": platform.python_version()},
        }

    def new_model(self, seed_offset: int = 0):
        """A fresh model of the run's architecture, initialised from ``seed + seed_offset``."""
        return build_model(self.model_cfg, seed=self.cfg.seed + seed_offset, device=self.device)

    def initial_model(self):
        """The main model at the start of training: :meth:`new_model`, or, with ``init_from``, the parameters
        of snapshot ``init_snapshot`` of that run file (which must be of this run's architecture). The
        references always start fresh."""
        model = self.new_model()
        c = self.cfg
        if c.init_from is None:
            return model
        from hcdiag.runfile import load_run

        src = load_run(c.init_from)
        if src.config.model != self.model_cfg.to_dict():
            raise InputError(f"{flag('--init-from', 'init_from')} {c.init_from}: its model "
                             f"({src.config.model}) is not this run's ({self.model_cfg.to_dict()}); start from a run "
                             "of the same architecture (widths, latent dimension, activation) and data dimension.")
        if not src.has_state(c.init_snapshot):
            raise InputError(f"{flag('--init-from', 'init_from')} {c.init_from} has no parameters for snapshot "
                             f"{c.init_snapshot!r} (it has: {', '.join(n for n in src.snapshot_names if src.has_state(n)) or 'none'}); "
                             f"pick one with {flag('--init-snapshot', 'init_snapshot')}.")
        model.load_state_dict(src.snapshot(c.init_snapshot))
        return model

    # -- public entry ------------------------------------------------------------------------------------
    def run(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Train, write the run file at every round and stage, and return the run dict.

        An existing ``out`` is continued with ``resume=True`` (when it was written with the same data and
        settings) or replaced with ``overwrite=True``; without either it is refused, and ``out`` is never
        the data file this run reads. While it trains, ``out`` is locked: a second trainer of the same
        ``out`` is refused (:class:`hcdiag.atomic.OutputLock`)."""
        lock = guard.claim_out(self, resume=resume, overwrite=overwrite) if self.out is not None else None
        try:
            self.setup()
            previous = guard.load_for_resume(self) if resume else None
            t_start = time.perf_counter()
            try:
                run = self._run(previous)
            except NonFinite as exc:
                raise NumericalError(self._stop_non_finite(exc.where)) from None
            self.timings["total"] = time.perf_counter() - t_start
            return run
        finally:
            if lock is not None:
                lock.release()

    def _run(self, previous: dict | None) -> dict:
        if previous is not None and "complete" in previous:
            self.progress.summary(f"{self.out} is already complete; nothing to resume.")
            return previous["complete"]
        # stage 0: clusterings (all methods: the memory curves of baselines use them too)
        if previous is not None and "resume" in previous:
            run = previous
            h = history_lists(run.get("history") or {})
            rows = saved_rows(h, run["resume"])
            run["history"] = {k: v[:rows] for k, v in h.items()}  # no row twice after a non-finite stop
            self.loop.set_centroids(run["clusterings"]["centroids"])
            for k, v in (run.get("timings") or {}).items():  # the time of the calls before this one (not the
                if k != "spectrum" and isinstance(v, (int, float)):  # spectrum: recomputed by every call)
                    self.timings[k] = self.timings.get(k, 0.0) + float(v)
            self.writer = RunWriter(run, self.out, self.loop, self.progress)
            self.writer.has_save = True
        else:  # a new run, or one stopped before its first save: start over from its clusterings
            run = self._new_run(previous["clusterings"] if previous is not None else None)
        self.writer.timings = self.timings
        self.method.train(self, run)
        train_references(self, run, self.method.pipeline)
        run["status"] = {"complete": True, "stage": "done", "error": None}
        run.pop("resume", None)
        run["timings"] = {k: float(v) for k, v in self.timings.items()}
        self.writer.write()
        return finalize_history(run)

    def _new_run(self, clusterings: dict | None = None) -> dict:
        """A fresh run dict: stage 0's clusterings fitted (or ``clusterings`` of an earlier try of this
        run, the same fit), nothing trained yet."""
        if clusterings is None:
            clusterings = self._fit_clusterings()
        self.loop.set_centroids(clusterings["centroids"])
        run = {
            "format": "hcdiag-run", "version": 1,
            "config": self.config_dict(),
            "eval": {"x": self.eval_x.cpu(), "xbar": self.xbar.float().cpu(),
                     "eigenvalues": torch.as_tensor(self.eigenvalues), "rows": torch.as_tensor(self.eval_idx)},
            "clusterings": clusterings,
            "rounds": [], "refinement": None, "stage3": None,
            "history": {k: [] for k in HISTORY_KEYS},
            "snapshots": {}, "snapshot_order": [], "references": {},
        }
        self.writer = RunWriter(run, self.out, self.loop, self.progress)
        return run

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

    def _stop_non_finite(self, where: str) -> str:
        """The message of a non-finite loss at ``where`` (stage, round, epoch, step), after writing what the
        run has so far as a partial run file (status.complete False, the message in status.error)."""
        run, out = (self.writer.run if self.writer else None), self.out
        cure = f"Lower {flag('--lr', 'lr')} or change {flag('--multiple', 'multiple')}/{flag('--loss', 'loss')}."
        if run is None or out is None:
            return f"non-finite loss in {where}; nothing was written (no run file). {cure}"
        what = ("" if "resume" in run else " (the stage-0 clusterings and the initial model; "
                f"{flag('--resume', 'resume=True')} starts over from them)")
        msg = (f"non-finite loss in {where}; the last good state{what} is kept in {out} as a partial run "
               f"({flag('hcdiag check-barrier --partial', 'load_run(partial=True) reads')} {out}). {cure}")
        stage = run["resume"]["position"].get("stage", "stage1") if "resume" in run else (
            "stage1" if self.method.pipeline else "baseline")
        run["status"] = {"complete": False, "stage": stage, "error": render(msg, cli=False)}  # the library's words
        from hcdiag.runfile import save_run

        try:
            save_run(finalize_history(run), out)
        except InputError as exc:
            return f"non-finite loss in {where}; the partial run could not be written either ({marked(exc)}). {cure}"
        return msg


def train(data, cfg: TrainConfig | None = None, out=None, *, resume: bool = False, overwrite: bool = False,
          progress: Progress | None = None, **overrides) -> dict:
    """Train ``data`` with ``cfg`` (or the smoke preset plus ``overrides``) and return the run dict."""
    from dataclasses import replace

    from hcdiag.train.config import make_config

    cfg = cfg if cfg is not None else make_config("smoke", **overrides)
    if cfg is not None and overrides:
        cfg = replace(cfg, **overrides)
    return Trainer(cfg, data, out, progress=progress).run(resume=resume, overwrite=overwrite)
