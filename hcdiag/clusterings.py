"""Stage 0 of Historical Consensus Training: R0 Gaussian-mixture clusterings of the data, and their audit.

The pipeline (claims.md "Training pipeline", paper Algorithm 1 line 1) runs EM ``R0 = 2^k`` times
with different seeds; run ``r`` uses seed ``seed + r``. Two backends fit the same model:

* ``sklearn``: one :class:`sklearn.mixture.GaussianMixture` per seed, spread over cores with joblib.
* ``torch``: one batched EM that fits all R runs at once as tensors of shape (R, K, N) (diagonal)
  or (R, K, N, N) (full), on CPU or GPU. It follows scikit-learn step by step: the same
  initialisations (random responsibilities drawn with ``numpy.random.RandomState(seed_r)`` exactly
  as scikit-learn draws them; k-means: scikit-learn's k-means++ seeding with the run's seed, then a
  batched Lloyd iteration with scikit-learn's stopping rule), the same M-step (``nk + 10 eps``,
  ``reg_covar`` added to the diagonal), and the same convergence rule (change of the mean
  log-likelihood lower bound below ``tol``).

Numerics of the torch backend (full covariance): by default everything is float64 and the
weighted log-density is a linear function of the augmented quadratic features
``f(x) = [x_i x_j (i <= j), x, 1]`` of the centred data, built once (n x (N(N+1)/2 + N + 1), kept
for the whole fit when it holds at most 2^27 numbers on CPU, else rebuilt per chunk): each EM
iteration is two GEMMs per chunk of rows against all R*K components at once, one for the E-step
(``coef @ f^T``), one for ``nk``, ``sum r x`` and ``sum r x x^T`` together (``resp @ f``).
``dtype='float32'`` instead works on whitened residuals ``y = (x - m) U`` with ``U U^T = Sigma^{-1}``
(Cholesky factors in float64) and maps the M-step statistics back with ``L`` (``Sigma = L L^T``):
``Sigma_new = L (E_r[y y^T] - E_r[y] E_r[y]^T) L^T``, so nothing large cancels in float32.

The audit measures how different the clusterings are (paper section 6.2: "If all EM runs produce
very similar clusterings, diversity is low and the method reduces to standard training"):
pairwise adjusted Rand index, Hungarian-matched centroid distances, groups of duplicates, and pairs
of clusterings sharing a centroid (which drive the best-constant loss delta* of claims.md T2 to 0).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> x = np.concatenate([rng.normal(-4, 1, (200, 2)), rng.normal(4, 1, (200, 2))])
>>> cs = fit_clusterings(x, 2, 2, backend="torch", device="cpu")
>>> cs.centroids.shape, cs.seeds.tolist()
((2, 2, 2), [0, 1])
>>> audit(cs, x).duplicate_groups  # both runs find the same two blobs
[[0, 1]]
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from hcdiag.errors import InputError, NumericalError, flag
from hcdiag.validation import as_data_matrix

Covariance = Literal["diag", "full"]
Backend = Literal["sklearn", "torch"]
Init = Literal["kmeans", "random"]

COVARIANCES = ("diag", "full")
BACKENDS = ("sklearn", "torch")
INITS = ("kmeans", "random")

#: Default duplicate / shared-centroid tolerance, as a fraction of the data's scale
#: ``sqrt(total variance)`` (see :func:`audit`).
DEFAULT_TOL_FRACTION = 0.01
#: Rows used by the audit's adjusted Rand index (a seeded subsample above this).
DEFAULT_AUDIT_ROWS = 10_000

_LOG_2PI = math.log(2.0 * math.pi)
_ILL_DEFINED = ("Fitting the mixture model failed because some components have ill-defined empirical "
                "covariance (for instance caused by singleton or collapsed samples); try to decrease "
                f"the number of components, or increase reg_covar{flag(' (--reg-covar)', '')}.")


# ----------------------------------------------------------------------------------------- R0, K


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


#: At most this many EM runs (the paper uses 16 to 32): every run is a full EM fit held in memory.
MAX_R0 = 4096


def check_r0(r0, *, uneven: bool = False) -> int:
    """Validate the number of initial clusterings R0 and return it as an int.

    Halving (Algorithm 1) needs ``R0 = 2^k >= 2`` so that every round keeps exactly half and the
    last round leaves a pair. The paper's Table 3 says R0 = 24, which is not a power of two;
    ``uneven=True`` accepts any R0 >= 2 (the caller then halves unevenly, rounding as it chooses).

    >>> check_r0(16)
    16
    >>> check_r0(24, uneven=True)
    24
    """
    if not _is_int(r0):
        raise InputError(f"The 'r0' parameter must be an integer >= 2 (number of EM runs). Got {r0!r}.")
    r0 = int(r0)
    if r0 < 2:
        raise InputError(f"The 'r0' parameter must be >= 2: halving ends with a pair of clusterings. Got {r0}.")
    if r0 > MAX_R0:
        raise InputError(f"The 'r0' parameter must be at most {MAX_R0} (each run is a full EM fit; the paper uses 16). "
                         f"Got {r0}.")
    if not uneven and r0 & (r0 - 1):
        lo = 1 << (r0.bit_length() - 1)
        raise InputError(f"The 'r0' parameter must be a power of two for halving (Algorithm 1): {r0} is not a "
                         f"power of two; use {lo} or {2 * lo}, or pass {flag('--uneven-halving', 'uneven=True')} to "
                         "halve unevenly.")
    return r0


def check_seed(seed, r0: int) -> int:
    """Validate the first EM seed: run r uses ``seed + r``, which must stay below 2**32 (scikit-learn's limit).

    >>> check_seed(7, 16)
    7
    """
    if not _is_int(seed) or seed < 0 or seed + r0 > 2**32:
        raise InputError(f"The 'seed' parameter must be an integer in [0, 2**32 - r0] (run r uses seed + r < 2**32; "
                         f"r0 = {r0}). Got {seed!r}.")
    return int(seed)


# ---------------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class ClusteringSet:
    """R Gaussian-mixture clusterings of the same data (stage 0 of the pipeline).

    Attributes
    ----------
    centroids : float32 array of shape (R, K, N), the component means ``mu_k^C`` (data units).
    weights : float64 array of shape (R, K), mixing weights (rows sum to 1).
    covariances : float64 array of shape (R, K, N) ('diag') or (R, K, N, N) ('full'), or None
        when only centroids are known (then hard assignments use the nearest centroid).
    covariance_type : 'diag' or 'full'.
    seeds : int64 array of shape (R,); run r of :func:`fit_clusterings` uses ``seed + r``.
    loglik : float64 array of shape (R,), mean per-sample log-likelihood on the fitted data (nats),
        at the final parameters (scikit-learn's ``score``).
    n_iter : int64 array of shape (R,), EM iterations run.
    converged : bool array of shape (R,), whether the lower bound changed by less than ``tol``.
    backend, init : how the set was fitted.
    config : the remaining fit settings (max_iter, tol, reg_covar, dtype, device).
    """

    centroids: np.ndarray
    weights: np.ndarray
    covariances: np.ndarray | None
    covariance_type: str
    seeds: np.ndarray
    loglik: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    backend: str
    init: str
    config: dict = field(default_factory=dict)

    def __post_init__(self):
        c = np.asarray(self.centroids, dtype=np.float32)
        if c.ndim != 3:
            raise InputError(f"ClusteringSet centroids must have shape (R, K, N); got shape {c.shape}.")
        r, k, n = c.shape
        w = np.asarray(self.weights, dtype=np.float64)
        if w.shape != (r, k):
            raise InputError(f"ClusteringSet weights must have shape {(r, k)} to match centroids {c.shape}; got {w.shape}.")
        if self.covariance_type not in COVARIANCES:
            raise InputError(f"ClusteringSet covariance_type must be one of {COVARIANCES}. Got {self.covariance_type!r}.")
        cov = None
        if self.covariances is not None:
            cov = np.asarray(self.covariances, dtype=np.float64)
            want = (r, k, n) if self.covariance_type == "diag" else (r, k, n, n)
            if cov.shape != want:
                raise InputError(f"ClusteringSet covariances ({self.covariance_type}) must have shape {want}; got {cov.shape}.")
        vals = {"centroids": c, "weights": w, "covariances": cov}
        for name, dtype in (("seeds", np.int64), ("loglik", np.float64), ("n_iter", np.int64), ("converged", bool)):
            v = np.asarray(getattr(self, name), dtype=dtype).reshape(-1)
            if v.shape != (r,):
                raise InputError(f"ClusteringSet {name} must have shape ({r},); got {v.shape}.")
            vals[name] = v
        for name, v in vals.items():
            object.__setattr__(self, name, v)
        object.__setattr__(self, "config", dict(self.config))

    # shape helpers
    @property
    def r(self) -> int:
        """Number of clusterings R."""
        return self.centroids.shape[0]

    @property
    def k(self) -> int:
        """Components per clustering K."""
        return self.centroids.shape[1]

    @property
    def dim(self) -> int:
        """Data dimension N."""
        return self.centroids.shape[2]

    def to_dict(self, *, include_covariances: bool = False) -> dict:
        """Metadata and arrays as plain lists (covariances only on request: (R, K, N, N) is large)."""
        d = {
            "r0": self.r, "k": self.k, "dim": self.dim,
            "covariance_type": self.covariance_type, "backend": self.backend, "init": self.init,
            "config": dict(self.config),
            "seeds": self.seeds.tolist(), "loglik": self.loglik.tolist(),
            "n_iter": self.n_iter.tolist(), "converged": self.converged.tolist(),
            "weights": self.weights.tolist(), "centroids": self.centroids.tolist(),
        }
        if include_covariances:
            d["covariances"] = None if self.covariances is None else self.covariances.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClusteringSet":
        """Inverse of :meth:`to_dict` (covariances None when they were not included)."""
        return cls(centroids=np.asarray(d["centroids"]), weights=np.asarray(d["weights"]),
                   covariances=None if d.get("covariances") is None else np.asarray(d["covariances"]),
                   covariance_type=d["covariance_type"], seeds=np.asarray(d["seeds"]),
                   loglik=np.asarray(d["loglik"], dtype=np.float64), n_iter=np.asarray(d["n_iter"]),
                   converged=np.asarray(d["converged"]), backend=d["backend"], init=d["init"],
                   config=d.get("config", {}))

    def _check_x(self, x) -> np.ndarray:
        x, _ = as_data_matrix(x, name="data", min_rows=1)
        if x.shape[1] != self.dim:
            raise InputError(f"The data has {x.shape[1]} columns but the clusterings have dimension {self.dim}; "
                             "pass data of the same dimension as the fitted data.")
        return np.asarray(x, dtype=np.float64)

    def weighted_log_prob(self, x) -> np.ndarray:
        """``log pi_k + log N(x | mu_k, Sigma_k)`` of every GMM, float64 of shape (R, m, K) (nats).

        ``x`` : array of shape (m, N). Needs covariances.
        """
        from scipy.linalg import solve_triangular

        if self.covariances is None:
            raise InputError("These clusterings carry no covariances, so their likelihood is undefined; "
                             "refit them or use nearest-centroid assignments.")
        x = self._check_x(x)
        m, n = x.shape
        out = np.empty((self.r, m, self.k))
        mu = self.centroids.astype(np.float64)
        for r in range(self.r):
            for k in range(self.k):
                diff = x - mu[r, k]  # (m, N)
                if self.covariance_type == "diag":
                    var = self.covariances[r, k]
                    q = (diff * diff / var).sum(1)
                    logdet = np.log(var).sum()
                else:
                    try:
                        chol = np.linalg.cholesky(self.covariances[r, k])
                    except np.linalg.LinAlgError:
                        raise NumericalError(f"Covariance {k} of clustering {r} is not positive definite. "
                                             + _ILL_DEFINED) from None
                    y = solve_triangular(chol, diff.T, lower=True)  # (N, m)
                    q = (y * y).sum(0)
                    logdet = 2.0 * np.log(np.diag(chol)).sum()
                out[r, :, k] = -0.5 * (n * _LOG_2PI + logdet + q) + np.log(self.weights[r, k])
        return out

    def responsibilities(self, x) -> np.ndarray:
        """Posterior ``T(k|x)`` of each GMM, float64 of shape (R, m, K); rows sum to 1.

        ``x`` : array of shape (m, N). This is the teacher of the witness certificate (claims.md T4).
        """
        from scipy.special import logsumexp

        wlp = self.weighted_log_prob(x)
        return np.exp(wlp - logsumexp(wlp, axis=2, keepdims=True))

    def score(self, x) -> np.ndarray:
        """Mean per-sample log-likelihood of ``x`` (m, N) under each GMM, shape (R,), nats."""
        from scipy.special import logsumexp

        return logsumexp(self.weighted_log_prob(x), axis=2).mean(axis=1)

    def hard_assignments(self, x) -> np.ndarray:
        """Most probable component of each row, int64 of shape (R, m) (nearest centroid without covariances)."""
        if self.covariances is not None:
            return self.weighted_log_prob(x).argmax(axis=2)
        x = self._check_x(x)
        mu = self.centroids.astype(np.float64)
        d2 = (x * x).sum(1)[None, :, None] - 2.0 * np.einsum("mn,rkn->rmk", x, mu) + (mu * mu).sum(2)[:, None, :]
        return d2.argmin(axis=2)


# ----------------------------------------------------------------------------------------- fitting


def fit_clusterings(x, r0: int, k: int, *, covariance: Covariance = "diag", backend: Backend = "sklearn",
                    init: Init = "kmeans", seed: int = 0, max_iter: int = 100, tol: float = 1e-3,
                    reg_covar: float = 1e-6, n_jobs: int | None = None, device="auto", uneven: bool = False,
                    dtype: Literal["auto", "float32", "float64"] = "auto",
                    progress: Callable[[str], None] | None = None) -> ClusteringSet:
    """Run EM ``r0`` times on ``x`` (stage 0 of the pipeline); run r uses seed ``seed + r``.

    Parameters
    ----------
    x : array of shape (n, N), finite (validated by :func:`hcdiag.validation.as_data_matrix`).
    r0 : number of EM runs; a power of two >= 2 unless ``uneven`` (see :func:`check_r0`).
    k : components K per mixture, 1 <= K <= n.
    covariance : 'diag' or 'full'.
    backend : 'sklearn' (one GaussianMixture per seed, ``n_jobs`` joblib workers; ``device`` is
        ignored) or 'torch' (all runs at once as batched tensors on ``device``).
    init : 'kmeans' (one k-means run per seed) or 'random' (random responsibilities).
    max_iter, tol, reg_covar : as in scikit-learn's GaussianMixture; ``tol`` applies to the change
        of the mean per-sample log-likelihood lower bound (nats).
    dtype : torch backend only: precision of the per-sample products; 'auto' is float64. 'float32'
        (full: whitened residuals, see the module docstring) is for GPUs with slow float64;
        parameters and Cholesky factors are always float64.
    progress : optional callable receiving one-line progress messages.

    Returns
    -------
    ClusteringSet with R = r0 clusterings.
    """
    r0 = check_r0(r0, uneven=uneven)
    if not _is_int(k) or k < 1:
        raise InputError(f"The 'k' parameter must be an integer >= 1 (components per clustering). Got {k!r}.")
    for name, val, allowed in (("covariance", covariance, COVARIANCES), ("backend", backend, BACKENDS),
                               ("init", init, INITS), ("dtype", dtype, ("auto", "float32", "float64"))):
        if val not in allowed:
            raise InputError(f"The '{name}' parameter must be one of {', '.join(allowed)}. Got {val!r}.")
    if not _is_int(max_iter) or max_iter < 1:
        raise InputError(f"The 'max_iter' parameter must be an integer >= 1. Got {max_iter!r}.")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise InputError(f"The 'tol' parameter must be a float >= 0. Got {tol!r}.")
    if not (isinstance(reg_covar, (int, float)) and math.isfinite(reg_covar) and reg_covar >= 0):
        raise InputError(f"The 'reg_covar' parameter must be a float >= 0. Got {reg_covar!r}.")
    check_seed(seed, r0)
    if n_jobs is not None and (not _is_int(n_jobs) or (n_jobs < 1 and n_jobs != -1)):
        raise InputError(f"The 'n_jobs' parameter must be an integer >= 1 or -1 (all cores). Got {n_jobs!r}.")
    x, _ = as_data_matrix(x, name="data", min_rows=1)
    if k > x.shape[0]:
        raise InputError(f"The 'k' parameter asks for K={k} components but the data has only {x.shape[0]} rows; "
                         f"use K <= {x.shape[0]} or more rows.")
    seeds = np.arange(seed, seed + r0, dtype=np.int64)
    config = {"max_iter": int(max_iter), "tol": float(tol), "reg_covar": float(reg_covar)}
    if backend == "sklearn":
        out = _fit_sklearn(x, seeds, k, covariance, init, max_iter, tol, reg_covar, n_jobs, progress)
        config["n_jobs"] = n_jobs
    else:
        from hcdiag.device import resolve_device

        dev = resolve_device(device)
        if dtype == "auto":
            dtype = "float64"
        out = _fit_torch(x, seeds, k, covariance, init, max_iter, tol, reg_covar, dev, dtype, progress)
        config.update(device=str(dev), dtype=dtype)
    means, weights, covs, loglik, n_iter, converged = out
    return ClusteringSet(centroids=means, weights=weights, covariances=covs, covariance_type=covariance,
                         seeds=seeds, loglik=loglik, n_iter=n_iter, converged=converged, backend=backend,
                         init=init, config=config)


def fingerprint(x: np.ndarray | None = None, settings: dict | None = None) -> str:
    """SHA-256 (hex) of a data matrix and/or of settings: the key of the EM cache and the fingerprint a run
    file keeps of its data and settings (``hcdiag train --resume`` refuses another data set).

    ``x`` : C-contiguous float32 array of shape (n, N): its shape and bytes are hashed, so a negated or
    permuted copy has another fingerprint. ``settings`` : JSON-able dict, hashed as sorted JSON.

    >>> a = np.arange(6, dtype=np.float32).reshape(3, 2)
    >>> fingerprint(a) == fingerprint(a.copy()), fingerprint(a) == fingerprint(a[::-1].copy())
    (True, False)
    """
    import hashlib
    import json

    h = hashlib.sha256()
    if x is not None:
        h.update(repr(x.shape).encode())
        h.update(memoryview(np.ascontiguousarray(x, dtype=np.float32)).cast("B"))
    if settings is not None:
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def fit_clusterings_cached(cache_dir, x, r0: int, k: int, **kw) -> tuple[ClusteringSet, bool]:
    """:func:`fit_clusterings` through a folder of results keyed by the data's bytes and every setting.

    Stage 0 depends only on the data and the EM settings, yet every run of a grid (HCT under each loss
    convention, the baselines, the phase runs: they record the same clusterings' losses) would fit it
    again; a grid of 39 paper-preset runs per seed shares a handful of distinct fits. One process fits a
    key while the others wait on a lock file (``fcntl.flock``; where the file system has no locks, each
    fits on its own and the last atomic write wins: same result, more work). Settings that change no
    result (``progress``, ``n_jobs``, ``uneven``) are not part of the key. Returns ``(set, hit)``.
    The file is written atomically; an unreadable one is refitted and replaced.
    """
    import json
    import os
    import zipfile
    import zlib
    from pathlib import Path

    from hcdiag.device import resolve_device

    xa, _ = as_data_matrix(x, name="data", min_rows=1)
    xa = np.ascontiguousarray(xa, dtype=np.float32)
    settings = {"r0": int(r0), "k": int(k), **{n: (resolve_device(v).type if n == "device" else v)
                                              for n, v in sorted(kw.items()) if n not in ("progress", "n_jobs", "uneven")}}
    key = fingerprint(xa, settings)
    folder = Path(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"Cannot create the EM cache folder {folder}: {exc.strerror}; choose a writable folder.") from None
    path = folder / f"em-{key[:32]}.npz"

    def read():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                cov = z["covariances"] if "covariances" in z.files else None
                return ClusteringSet(centroids=z["centroids"], weights=z["weights"], covariances=cov,
                                     covariance_type=meta["covariance_type"], seeds=z["seeds"], loglik=z["loglik"],
                                     n_iter=z["n_iter"], converged=z["converged"], backend=meta["backend"],
                                     init=meta["init"], config=meta["config"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error, InputError):
            return None  # truncated or corrupt (e.g. a writer killed on a file system without atomic rename): refit

    from hcdiag.atomic import cache_lock

    with cache_lock(folder / (path.stem + ".lock")):  # one process fits a key; the others wait, then read it
        if path.exists() and (cs := read()) is not None:
            return cs, True
        cs = fit_clusterings(xa, r0, k, **kw)
        arrays = {"centroids": cs.centroids, "weights": cs.weights, "seeds": cs.seeds, "loglik": cs.loglik,
                  "n_iter": cs.n_iter, "converged": cs.converged,
                  "meta": np.array(json.dumps({"covariance_type": cs.covariance_type, "backend": cs.backend,
                                               "init": cs.init, "config": cs.config, "settings": settings},
                                              default=str))}
        if cs.covariances is not None:
            arrays["covariances"] = cs.covariances
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)  # the cache is an optimisation: the fit itself is returned
        return cs, False


# ------------------------------------------------------------------------------- sklearn backend


def _fit_one_sklearn(x, seed, k, covariance, init, max_iter, tol, reg_covar):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(n_components=k, covariance_type=covariance, init_params=init, random_state=int(seed),
                         max_iter=max_iter, tol=tol, reg_covar=reg_covar)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported through `converged`
        try:
            gm.fit(x)
        except ValueError as exc:
            if "ill-defined empirical covariance" in str(exc):
                raise NumericalError(f"EM run with seed {seed}: " + _ILL_DEFINED) from None
            raise
    return (np.asarray(gm.means_, np.float64), np.asarray(gm.weights_, np.float64),
            np.asarray(gm.covariances_, np.float64), float(gm.score(x)), int(gm.n_iter_), bool(gm.converged_))


def _fit_sklearn(x, seeds, k, covariance, init, max_iter, tol, reg_covar, n_jobs, progress):
    from joblib import Parallel, delayed

    jobs = (delayed(_fit_one_sklearn)(x, s, k, covariance, init, max_iter, tol, reg_covar) for s in seeds)
    results = []
    if n_jobs is not None and n_jobs > len(seeds):
        n_jobs = len(seeds)  # more workers than EM runs would idle (and joblib refuses absurd counts)
    for i, res in enumerate(Parallel(n_jobs=n_jobs, return_as="generator")(jobs)):
        results.append(res)
        if progress is not None:
            progress(f"EM run {i + 1}/{len(seeds)} (seed {seeds[i]}): loglik {res[3]:.4f}, {res[4]} iterations"
                     + ("" if res[5] else ", NOT converged"))
    means, weights, covs, ll, it, conv = zip(*results)
    return (np.stack(means).astype(np.float32), np.stack(weights), np.stack(covs), np.array(ll),
            np.array(it, dtype=np.int64), np.array(conv, dtype=bool))


# --------------------------------------------------------------------------------- torch backend


def _chunk_rows(n: int, per_row: int, device) -> int:
    """Rows per chunk so that the per-chunk temporaries (``per_row`` numbers a row) hold ~2^24 (CPU) / 2^28 (GPU) numbers."""
    budget = (1 << 28) if device.type == "cuda" else (1 << 24)
    return int(max(256, min(n, budget // max(per_row, 1))))


def _kmeans_plusplus(xt, seeds, k):
    """scikit-learn's greedy k-means++ seeding (``sklearn.cluster.kmeans_plusplus``), for all runs at once.

    Run r draws from ``RandomState(seed_r)`` exactly as scikit-learn does (first centre uniformly,
    then ``2 + int(log K)`` candidates per step sampled in proportion to the squared distance to the
    closest centre, keeping the candidate that lowers the potential most); the distances are batched
    tensors. ``xt`` : (n, N) centred data; returns centres (R, K, N).
    """
    import torch

    n, dim = xt.shape
    r = len(seeds)
    dev = xt.device
    rngs = [np.random.RandomState(int(s)) for s in seeds]
    trials = 2 + int(np.log(k))
    w = np.ones(n, dtype=np.float32)
    first = [rng.choice(n, p=w / w.sum()) for rng in rngs]
    x2 = (xt * xt).sum(1)  # (n,)

    def sqdist(c):  # (R, L, N) -> squared distances to every row, (R, L, n)
        return (x2 + (c * c).sum(-1, keepdim=True) - 2.0 * torch.matmul(c, xt.T)).clamp_min(0)

    idx = torch.as_tensor(first, device=dev)[:, None]  # (R, 1)
    centers = [xt[idx[:, 0]]]  # K tensors of shape (R, N)
    closest = sqdist(xt[idx])[:, 0]  # (R, n)
    pot = closest.sum(1)  # (R,)
    rows = torch.arange(r, device=dev)
    for _ in range(1, k):
        draws = np.stack([rng.uniform(size=trials) for rng in rngs])  # (R, L)
        rand = torch.as_tensor(draws, dtype=xt.dtype, device=dev) * pot[:, None]
        cand = torch.searchsorted(torch.cumsum(closest, dim=1), rand).clamp_max(n - 1)  # (R, L)
        dist = torch.minimum(closest[:, None, :], sqdist(xt[cand]))  # (R, L, n)
        cpot = dist.sum(2)  # (R, L)
        best = cpot.argmin(1)  # (R,)
        pot = cpot[rows, best]
        closest = dist[rows, best]
        centers.append(xt[cand[rows, best]])
    return torch.stack(centers, dim=1)  # (R, K, N)


def _kmeans_init_labels(x_np, device, seeds, k, progress):
    """Batched k-means as scikit-learn runs it for GaussianMixture(init_params='kmeans').

    Seeding: scikit-learn's k-means++ draws with ``RandomState(seed_r)`` on the centred data (what
    ``KMeans(n_init=1, random_state=seed_r)`` does); then Lloyd iterations for all runs at once, in
    float32 (scikit-learn runs k-means in the data's dtype), a run stopping at strict convergence
    (labels unchanged) or when its squared centre shift is at most ``1e-4 * mean(var(x))``
    (scikit-learn's tolerance), at most 300 iterations. Returns labels (R, n) of the final centres:
    a run that stopped at strict convergence keeps its last labels (its centres no longer move), the
    others are re-assigned to their final centres, as scikit-learn's ``_kmeans_single_lloyd`` does.

    One Lloyd iteration for the A active runs is one GEMM ``x @ C^T`` against all A*K centres (the
    squared distance up to the per-row ``||x||^2``), an argmin over each run's K columns, and one
    GEMM ``onehot^T @ x`` for the new centres; converged runs drop out of the batch.
    """
    import torch

    xc = np.asarray(x_np, dtype=np.float32)
    xc = xc - xc.mean(axis=0)
    tol = 1e-4 * float(np.var(xc, axis=0).mean())
    xt = torch.as_tensor(xc, device=device)  # (n, N) float32
    n, dim = xt.shape
    c = _kmeans_plusplus(xt, seeds, k)  # (R, K, N)
    r = c.shape[0]
    x1 = torch.cat([xt, torch.ones(n, 1, dtype=xt.dtype, device=device)], dim=1)  # (n, N+1): sums and counts

    def assign(c):  # centres (A, K, N) -> labels (A, n) of the nearest centre of each run
        a = c.shape[0]
        # ||x - c||^2 up to the per-row ||x||^2, for all A*K centres in one GEMM; (A, K, n)
        d = torch.addmm((c * c).sum(2).reshape(a * k, 1), c.reshape(a * k, dim), xt.T, alpha=-2.0).view(a, k, n)
        return torch.min(d, dim=1).indices  # first minimum, as argmin; min over the middle axis is fast

    final = torch.empty(r, n, dtype=torch.long, device=device)  # labels of the runs that are done
    reassign = []  # runs stopped by the shift tolerance (or max_iter): re-assign to their final centres
    act = np.arange(r)  # runs still iterating
    labels_old = None  # (A, n) labels of the active runs at the previous iteration
    for it in range(300):
        a = len(act)
        ca = c[act]  # (A, K, N)
        labels = assign(ca)  # (A, n)
        rows = labels + torch.arange(0, a * k, k, device=device)[:, None]  # (A, n): row in the (A*K) layout
        onehot = torch.zeros(a * k, n, dtype=xt.dtype, device=device).scatter_(0, rows, 1.0)  # (A*K, n)
        sums = (onehot @ x1).view(a, k, dim + 1)  # (A, K, N+1): sum of the members, count
        counts = sums[..., dim]
        new = sums[..., :dim] / counts.clamp_min(1)[..., None]  # (A, K, N)
        empty = counts == 0
        if bool(empty.any()):  # scikit-learn relocates empty clusters to the points farthest from their centre
            for ri in torch.nonzero(empty.any(1)).flatten().tolist():
                dist = ((xt - ca[ri][labels[ri]]) ** 2).sum(1)  # (n,)
                far = torch.argsort(dist, descending=True)
                for j, ki in enumerate(torch.nonzero(empty[ri]).flatten().tolist()):
                    new[ri, ki] = xt[far[j]]
        c[act] = new
        strict = np.zeros(a, dtype=bool) if labels_old is None else (labels == labels_old).all(1).cpu().numpy()
        small = (((new - ca) ** 2).sum((1, 2)) <= tol).cpu().numpy()
        stop = strict | small | (it == 299)
        if stop.any():
            idx = np.flatnonzero(stop)
            final[act[idx]] = labels[idx]
            reassign.extend(act[idx[~strict[idx]]].tolist())
            keep = np.flatnonzero(~stop)
            act = act[keep]
            labels_old = labels[keep]
        else:
            labels_old = labels
        if len(act) == 0:
            break
    if reassign:
        runs = np.asarray(sorted(reassign))
        final[runs] = assign(c[runs])
    if progress is not None:
        progress(f"k-means init: {it + 1} Lloyd iterations for {r} runs")
    return final  # (R, n)


def _init_resp(x_np, xt, seeds, k, init, progress):
    """Initial responsibilities as scikit-learn's ``_initialize_parameters``, float64 of shape (n, R*K)
    (column ``r*K + k`` is component k of run r: the layout of the batched GEMMs)."""
    import torch

    n = x_np.shape[0]
    r = len(seeds)
    if init == "random":
        resp = np.stack([np.random.RandomState(int(s)).uniform(size=(n, k)) for s in seeds], axis=1)  # (n, R, K)
        resp /= resp.sum(axis=2, keepdims=True)
        return torch.as_tensor(resp.reshape(n, r * k), dtype=torch.float64, device=xt.device)
    labels = _kmeans_init_labels(x_np, xt.device, seeds, k, progress)  # (R, n)
    cols = labels.T + torch.arange(0, r * k, k, device=xt.device)  # (n, R)
    return torch.zeros(n, r * k, dtype=torch.float64, device=xt.device).scatter_(1, cols, 1.0)


#: Largest feature matrix kept for the whole EM (numbers): (n, N(N+1)/2 + N + 1) float64, 1 GiB on CPU.
_FEATURE_CACHE = {"cpu": 1 << 27, "cuda": 1 << 29}


def _quad_features(xs):
    """Augmented quadratic features ``[x_i x_j (i <= j, row-major upper triangle), x, 1]`` of rows
    ``xs`` (c, N): shape (c, N(N+1)/2 + N + 1), same dtype. With them the Gaussian log-density is
    one GEMM (``_estep_full64``) and ``nk``, ``sum r x`` and ``sum r x x^T`` are another."""
    import torch

    c, dim = xs.shape
    p = dim * (dim + 1) // 2
    out = torch.empty(c, p + dim + 1, dtype=xs.dtype, device=xs.device)
    o = 0
    for i in range(dim):  # N slice products: much faster than gathering xs[:, iu] * xs[:, ju]
        torch.mul(xs[:, i:i + 1], xs[:, i:], out=out[:, o:o + dim - i])
        o += dim - i
    out[:, p:p + dim] = xs
    out[:, p + dim] = 1.0
    return out


def _feature_chunks(xt64, feats, step):
    """Yield row chunks of the augmented quadratic features: views of ``feats`` (n, P') when it was
    cached, else built per chunk from ``xt64`` (n, N)."""
    n = xt64.shape[0]
    for s in range(0, n, step):
        yield feats[s:s + step] if feats is not None else _quad_features(xt64[s:s + step])


def _features_or_none(xt64):
    """The features of all rows when they fit in ``_FEATURE_CACHE`` numbers, else None (built per chunk)."""
    n, dim = xt64.shape
    width = dim * (dim + 1) // 2 + dim + 1
    budget = _FEATURE_CACHE["cuda" if xt64.device.type == "cuda" else "cpu"]
    return _quad_features(xt64) if n * width <= budget else None


def _moments_full(stats, a, k, dim):
    """Split the (A*K, P+N+1) GEMM ``resp^T @ features`` into ``nk (A, K)``, ``s1 (A, K, N)``, ``s2 (A, K, P)``."""
    p = dim * (dim + 1) // 2
    stats = stats.view(a, k, -1)
    return stats[..., p + dim], stats[..., p:p + dim], stats[..., :p]


def _init_params(xt64, resp, r, k, covariance, reg_covar, feats=None):
    """scikit-learn's ``_initialize``: weights, means and covariances from responsibilities (n, R*K)."""
    import torch

    n, dim = xt64.shape
    eps = 10 * torch.finfo(torch.float64).eps
    if covariance == "diag":
        nk = resp.sum(0).view(r, k) + eps  # (R, K)
        means = (resp.T @ xt64).view(r, k, dim) / nk[..., None]  # (R, K, N): one GEMM for all runs
        ex2 = (resp.T @ (xt64 * xt64)).view(r, k, dim) / nk[..., None]
        cov = ex2 - 2.0 * means * means + means * means + reg_covar  # sklearn's _estimate_gaussian_covariances_diag
    else:
        iu, ju = torch.triu_indices(dim, dim, device=xt64.device)
        width = len(iu) + dim + 1
        stats = torch.zeros(r * k, width, dtype=torch.float64, device=xt64.device)
        step = _chunk_rows(n, width + r * k, xt64.device)
        for s, f in zip(range(0, n, step), _feature_chunks(xt64, feats, step)):
            stats += resp[s:s + step].T @ f  # (R*K, P+N+1)
        nk, s1, s2 = _moments_full(stats, r, k, dim)
        nk = nk + eps
        means, cov = _full_from_moments(nk, s1, s2, iu, ju, dim, reg_covar)
    return nk / nk.sum(1, keepdim=True), means, cov


def _full_from_moments(nk, s1, s2, iu, ju, dim, reg_covar):
    """Means (A, K, N) and covariances (A, K, N, N) from ``nk``, ``sum r x`` and the upper triangle of
    ``sum r x x^T`` (float64, data centred: ``E_r[x x^T] - m m^T`` loses ~1e-16 relative, harmless)."""
    import torch

    a, k = nk.shape
    means = s1 / nk[..., None]
    m2 = torch.zeros(a, k, dim, dim, dtype=torch.float64, device=nk.device)
    m2[..., iu, ju] = s2 / nk[..., None]
    m2[..., ju, iu] = s2 / nk[..., None]
    cov = m2 - means[..., :, None] * means[..., None, :]
    cov = cov + reg_covar * torch.eye(dim, dtype=torch.float64, device=nk.device)
    return means, cov


def _cholesky(cov, runs):
    import torch

    chol, info = torch.linalg.cholesky_ex(cov)
    if bool((info > 0).any()):
        bad = torch.nonzero(info > 0)[0].tolist()
        raise NumericalError(f"EM run with seed {int(runs[bad[0]])}, component {bad[1]}: " + _ILL_DEFINED)
    return chol


def _estep_full64(xt64, feats, means, cov, weights, runs, stats: bool):
    """E-step for full covariances in float64, all A runs of the batch in one pass over the data.

    The weighted log-density is a linear function of the augmented quadratic features
    ``f(x) = [(x_i x_j)_{i<=j}, x, 1]`` (:func:`_quad_features`, ``feats`` when cached):
    ``log pi_k + log N(x | m, Sigma) = -0.5 (x_i x_j) . w(P) + x . P m + c_k`` with ``P = Sigma^-1``,
    ``w`` doubling the off-diagonal entries and ``c_k = log pi_k - 0.5 (N log 2 pi + log det Sigma +
    m^T P m)``, so the E-step is one GEMM per chunk against all A*K components, and the M-step's
    ``nk``, ``sum r x`` and ``sum r x x^T`` are one more (``resp^T @ f``). Returns the mean
    log-likelihood per run (A,) and, if ``stats``, ``nk (A, K)``, ``sum_i r x (A, K, N)`` and
    ``sum_i r x x^T`` (upper triangle, (A, K, N(N+1)/2)).
    """
    import torch

    n, dim = xt64.shape
    a, k = weights.shape
    dev = xt64.device
    iu, ju = torch.triu_indices(dim, dim, device=dev)
    p = len(iu)
    chol = _cholesky(cov, runs)  # (A, K, N, N)
    prec = torch.cholesky_inverse(chol)  # (A, K, N, N)
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # (A, K), log det Sigma
    pm = (prec @ means[..., None]).squeeze(-1)  # (A, K, N)
    # coefficients of every component in rows, (A*K, P'): the GEMM coef @ f^T is much faster on CPU
    # than f @ coef^T (M = A*K small, N = rows large), and leaves each run's K values on a middle axis
    coef = torch.empty(a * k, p + dim + 1, dtype=torch.float64, device=dev)
    coef[:, :p] = (prec[..., iu, ju] * torch.where(iu == ju, -0.5, -1.0).to(prec)).reshape(a * k, p)
    coef[:, p:p + dim] = pm.reshape(a * k, dim)
    coef[:, p + dim] = (torch.log(weights) - 0.5 * (dim * _LOG_2PI + logdet + (means * pm).sum(-1))).reshape(a * k)
    ll = torch.zeros(a, dtype=torch.float64, device=dev)
    if stats:
        acc = torch.zeros(a * k, p + dim + 1, dtype=torch.float64, device=dev)
    step = _chunk_rows(n, p + dim + 1 + 2 * a * k, dev)
    for f in _feature_chunks(xt64, feats, step):
        lp = coef @ f.T  # (A*K, c): log pi_k + log N(x | m_k, Sigma_k) of every run's components
        lp3 = lp.view(a, k, -1)
        if stats:
            # logsumexp and the responsibilities from one exp, in place: resp = exp(lp - max) / sum
            top = lp3.amax(dim=1, keepdim=True)  # (A, 1, c)
            lp3.sub_(top).exp_()
            tot = lp3.sum(dim=1, keepdim=True)
            ll += (top + torch.log(tot)).sum((1, 2))
            lp3.div_(tot)
            acc += lp @ f  # (A*K, P'): nk, sum r x, sum r x x^T
        else:
            ll += torch.logsumexp(lp3, dim=1).sum(-1)
    if not stats:
        return ll / n
    nk, s1, s2 = _moments_full(acc, a, k, dim)
    return ll / n, nk, s1, s2, (iu, ju)


def _estep_full32(xt, means, cov, weights, runs, stats: bool):
    """E-step for full covariances with float32 per-sample products (opt-in ``dtype='float32'``).

    Works on whitened residuals ``y = (x - m) U`` with ``U = L^{-T}``, ``Sigma = L L^T`` (float64 factors),
    where no large terms cancel. Returns the mean log-likelihood (A,) and, if ``stats``, ``nk (A, K)``,
    ``sum_i r y (A, K, N)``, ``sum_i r y y^T (A, K, N, N)`` and ``L``.
    """
    import torch

    n, dim = xt.shape
    a, k = weights.shape
    dev = xt.device
    chol = _cholesky(cov, runs)  # (A, K, N, N)
    eye = torch.eye(dim, dtype=torch.float64, device=dev).expand_as(chol)
    u = torch.linalg.solve_triangular(chol, eye, upper=False).transpose(-1, -2)  # (A, K, N, N), U U^T = P
    logdet_u = torch.log(torch.diagonal(u, dim1=-2, dim2=-1)).sum(-1)  # (A, K) = -0.5 log det Sigma
    const = (logdet_u + torch.log(weights) - 0.5 * dim * _LOG_2PI).to(xt.dtype)[..., None]  # (A, K, 1)
    # append a row -m U so that [x, 1] @ [U; -m U] = (x - m) U in one GEMM
    u_aug = torch.cat([u, -(means[:, :, None, :] @ u)], dim=2).to(xt.dtype)  # (A, K, N+1, N)
    ones = torch.ones(n, 1, dtype=xt.dtype, device=dev)
    ll = torch.zeros(a, dtype=torch.float64, device=dev)
    if stats:
        nk = torch.zeros(a, k, dtype=torch.float64, device=dev)
        s1 = torch.zeros(a, k, dim, dtype=torch.float64, device=dev)
        s2 = torch.zeros(a, k, dim, dim, dtype=torch.float64, device=dev)
    step = _chunk_rows(n, a * k * dim, dev)
    for s in range(0, n, step):
        xs = torch.cat([xt[s:s + step], ones[s:s + step]], dim=1)  # (c, N+1)
        y = torch.matmul(xs, u_aug)  # (A, K, c, N)
        lp = const - 0.5 * torch.linalg.vector_norm(y, dim=-1).square()  # (A, K, c)
        lse = torch.logsumexp(lp, dim=1)  # (A, c)
        ll += lse.sum(-1, dtype=torch.float64)
        if stats:
            sr = torch.exp(0.5 * (lp - lse[:, None, :]))  # sqrt of the responsibilities, (A, K, c)
            nk += sr.square().sum(-1, dtype=torch.float64)
            y.mul_(sr[..., None])
            s1 += (sr[:, :, None, :] @ y).squeeze(-2).double()
            s2 += (y.transpose(-1, -2) @ y).double()
    if not stats:
        return ll / n
    return ll / n, nk, s1, s2, chol


def _estep_diag(xt, means, var, weights):
    """Per-sample weighted log probabilities for diagonal covariances, per chunk: yields (start, xs, lp (A, K, c))."""
    import torch

    n, dim = xt.shape
    if bool((var <= 0).any()):
        raise NumericalError("EM produced a non-positive variance; " + _ILL_DEFINED)
    prec = (1.0 / var).to(xt.dtype)  # (A, K, N)
    mp = means.to(xt.dtype) * prec
    const = (torch.log(weights) - 0.5 * (dim * _LOG_2PI + torch.log(var).sum(-1))).to(xt.dtype)
    const = const - 0.5 * (means.to(xt.dtype) * mp).sum(-1)  # (A, K)
    a, k = weights.shape
    step = _chunk_rows(n, a * k * 4, xt.device)
    for s in range(0, n, step):
        xs = xt[s:s + step]
        # (x - m)^2 / var expanded as in scikit-learn's _estimate_log_gaussian_prob (diag); (A, K, c)
        q = torch.matmul(prec, (xs * xs).T) - 2.0 * torch.matmul(mp, xs.T)
        yield s, xs, const[..., None] - 0.5 * q


def _em_step(xt, covariance, dtype, m, c, w, runs, reg_covar, eps, feats=None):
    """One EM iteration for the batch: returns (lower bound (A,), new means, new covariances, nk).

    ``feats`` : the cached quadratic features of ``xt`` (full, float64), or None.
    """
    import torch

    dim = xt.shape[1]
    if covariance == "full" and dtype == "float64":
        ll, nk, s1, s2, (iu, ju) = _estep_full64(xt, feats, m, c, w, runs, stats=True)
        nk = nk + eps
        new_means, new_cov = _full_from_moments(nk, s1, s2, iu, ju, dim, reg_covar)
    elif covariance == "full":
        ll, nk, s1, s2, chol = _estep_full32(xt, m, c, w, runs, stats=True)
        nk = nk + eps
        ybar = s1 / nk[..., None]  # (A, K, N), whitened mean shift
        yy = s2 / nk[..., None, None] - ybar[..., :, None] * ybar[..., None, :]  # (A, K, N, N)
        new_means = m + (chol @ ybar[..., None]).squeeze(-1)  # x - m = L y
        new_cov = chol @ yy @ chol.transpose(-1, -2)
        new_cov = 0.5 * (new_cov + new_cov.transpose(-1, -2))
        new_cov = new_cov + reg_covar * torch.eye(dim, dtype=torch.float64, device=xt.device)
    else:
        a, k = w.shape
        ll = torch.zeros(a, dtype=torch.float64, device=xt.device)
        nk = torch.zeros(a, k, dtype=torch.float64, device=xt.device)
        sx = torch.zeros(a, k, dim, dtype=torch.float64, device=xt.device)
        sxx = torch.zeros(a, k, dim, dtype=torch.float64, device=xt.device)
        for _, xs, lp in _estep_diag(xt, m, c, w):
            lse = torch.logsumexp(lp, dim=1)  # (A, c)
            ll += lse.sum(-1, dtype=torch.float64)
            rs = torch.exp(lp - lse[:, None, :])  # (A, K, c)
            nk += rs.sum(-1, dtype=torch.float64)
            sx += (rs @ xs).double()
            sxx += (rs @ (xs * xs)).double()
        ll = ll / xt.shape[0]
        nk = nk + eps
        new_means = sx / nk[..., None]
        # sklearn's _estimate_gaussian_covariances_diag: E[x^2] - 2 m E[x] + m^2 + reg
        new_cov = sxx / nk[..., None] - 2.0 * new_means * sx / nk[..., None] + new_means ** 2 + reg_covar
    return ll, new_means, new_cov, nk


def _loglik(xt, covariance, dtype, means, cov, weights, runs, feats=None):
    """Mean per-sample log-likelihood (R,) at the given parameters (scikit-learn's ``score``)."""
    import torch

    if covariance == "full" and dtype == "float64":
        return _estep_full64(xt, feats, means, cov, weights, runs, stats=False)
    if covariance == "full":
        return _estep_full32(xt, means, cov, weights, runs, stats=False)
    ll = torch.zeros(weights.shape[0], dtype=torch.float64, device=xt.device)
    for _, _, lp in _estep_diag(xt, means, cov, weights):
        ll += torch.logsumexp(lp, dim=1).sum(-1, dtype=torch.float64)
    return ll / xt.shape[0]


def _fit_torch(x_np, seeds, k, covariance, init, max_iter, tol, reg_covar, device, dtype, progress):
    import torch

    tdtype = torch.float32 if dtype == "float32" else torch.float64
    x64 = np.asarray(x_np, dtype=np.float64)
    shift = x64.mean(axis=0)  # a GMM fit is translation-equivariant; centring keeps the products small
    xt64 = torch.as_tensor(x64 - shift, device=device)
    xt = xt64 if tdtype == torch.float64 else xt64.to(tdtype)
    r = len(seeds)
    resp = _init_resp(x64 - shift, xt, seeds, k, init, progress)  # (n, R*K)
    # full float64: the quadratic features are built once for the init, every EM step and the score
    feats = _features_or_none(xt64) if covariance == "full" and dtype == "float64" else None
    weights, means, cov = _init_params(xt64, resp, r, k, covariance, reg_covar, feats)
    del resp
    eps = 10 * torch.finfo(tdtype).eps  # sklearn: nk + 10 eps of the responsibilities' dtype
    lower = torch.full((r,), -math.inf, dtype=torch.float64, device=device)
    n_iter = np.zeros(r, dtype=np.int64)
    converged = np.zeros(r, dtype=bool)
    active = np.arange(r)
    for it in range(1, max_iter + 1):
        idx = torch.as_tensor(active, device=device)
        ll, new_means, new_cov, nk = _em_step(xt, covariance, dtype, means[idx], cov[idx], weights[idx],
                                              seeds[active], reg_covar, eps, feats)
        if not bool(torch.isfinite(ll).all()):
            raise NumericalError("EM produced a non-finite log-likelihood; " + _ILL_DEFINED)
        means[idx], cov[idx], weights[idx] = new_means, new_cov, nk / nk.sum(1, keepdim=True)
        change = (ll - lower[idx]).cpu().numpy()  # the convergence rule of sklearn's BaseMixture.fit_predict
        lower[idx] = ll
        n_iter[active] = it
        done = np.abs(change) < tol
        converged[active[done]] = True
        active = active[~done]
        if progress is not None:
            progress(f"EM iteration {it}: {len(active)}/{r} runs still active, mean lower bound "
                     f"{float(ll.mean()):.4f}")
        if len(active) == 0:
            break
    loglik = _loglik(xt, covariance, dtype, means, cov, weights, seeds, feats)
    del feats
    means = means.cpu().numpy() + shift
    return (means.astype(np.float32), weights.cpu().numpy(), cov.cpu().numpy(), loglik.cpu().numpy(),
            n_iter, converged)


# ------------------------------------------------------------------------------------------ audit


@dataclass(frozen=True)
class ClusteringAudit:
    """How different R clusterings are (paper 6.2; claims.md T2 duplicate and shared-centroid structure).

    Attributes
    ----------
    ari : (R, R) adjusted Rand index of the hard assignments of the audit rows (1 on the
        diagonal), or None when no data was given.
    centroid_dist : (R, R) mean distance between Hungarian-matched centroids (data units, not squared).
    matched_max_dist : (R, R) largest distance among the Hungarian-matched centroid pairs.
    min_pair_centroid_dist : (R, R) ``min_{k,j} ||mu_k^a - mu_j^b||`` (0 on the diagonal);
        ``min_pair_centroid_dist**2 / 4`` is the pairwise delta* of claims.md T2.
    duplicate_groups : groups (size >= 2) of clusterings that are (nearly) identical: a and b are
        duplicates when every matched centroid pair is within ``tol``; groups are the connected
        components of that relation.
    shared_centroids : ``(a, j, b, k, dist)`` for every a < b and centroid j of a, k of b with
        ``||mu_j^a - mu_k^b|| <= tol``.
    warnings : human-readable warnings (all or nearly all clusterings identical; shared centroids).
    tol : the distance tolerance used (data units).
    scale : ``sqrt(total variance)`` of the data (from ``x``, or from the mixtures' moments).
    n_rows : rows used for the ARI (0 without data).
    """

    ari: np.ndarray | None
    centroid_dist: np.ndarray
    matched_max_dist: np.ndarray
    min_pair_centroid_dist: np.ndarray
    duplicate_groups: list
    shared_centroids: list
    warnings: list
    tol: float
    scale: float
    n_rows: int

    def to_dict(self) -> dict:
        return {
            "ari": None if self.ari is None else self.ari.tolist(),
            "centroid_dist": self.centroid_dist.tolist(),
            "matched_max_dist": self.matched_max_dist.tolist(),
            "min_pair_centroid_dist": self.min_pair_centroid_dist.tolist(),
            "duplicate_groups": [list(g) for g in self.duplicate_groups],
            "shared_centroids": [{"a": a, "j": j, "b": b, "k": k, "dist": d} for a, j, b, k, d in self.shared_centroids],
            "warnings": list(self.warnings), "tol": self.tol, "scale": self.scale, "n_rows": self.n_rows,
        }


def _mixture_scale(cs: ClusteringSet) -> float:
    """sqrt of the total variance implied by the mixtures (EM matches the data's moments), mean over runs."""
    if cs.covariances is None:
        w = cs.weights[..., None]
        mu = cs.centroids.astype(np.float64)
        grand = (w * mu).sum(1, keepdims=True)
        return float(np.sqrt(np.mean((w * (mu - grand) ** 2).sum((1, 2)))))
    tr = cs.covariances.sum(-1) if cs.covariance_type == "diag" else np.trace(cs.covariances, axis1=-2, axis2=-1)
    mu = cs.centroids.astype(np.float64)
    grand = (cs.weights[..., None] * mu).sum(1, keepdims=True)
    total = (cs.weights * (tr + ((mu - grand) ** 2).sum(-1))).sum(1)  # (R,)
    return float(np.sqrt(total.mean()))


def _components(r: int, edges) -> list[list[int]]:
    parent = list(range(r))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in edges:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in range(r):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values()), key=lambda g: g[0])


def audit(clusterings: ClusteringSet, x=None, *, tol: float | None = None, max_rows: int = DEFAULT_AUDIT_ROWS,
          seed: int = 0) -> ClusteringAudit:
    """Diversity audit of a set of clusterings.

    Parameters
    ----------
    clusterings : the R clusterings.
    x : optional data of shape (m, N); the ARI uses the hard assignments of ``x`` (a seeded
        subsample of ``max_rows`` rows when m is larger).
    tol : distance (data units) under which two centroids count as the same; default
        ``0.01 * scale`` with ``scale = sqrt(total variance)`` of ``x`` (or, without ``x``, of the
        mixtures, which EM matches to the data's).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist
    from sklearn.metrics import adjusted_rand_score

    cs = clusterings
    r = cs.r
    if x is not None:
        x = cs._check_x(x)
        scale = float(np.sqrt(x.var(axis=0).sum()))
    else:
        scale = _mixture_scale(cs)
    if tol is None:
        tol = DEFAULT_TOL_FRACTION * scale
    elif not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise InputError(f"The 'tol' parameter must be a distance >= 0 (data units). Got {tol!r}.")
    mu = cs.centroids.astype(np.float64)
    mean_d = np.zeros((r, r))
    max_d = np.zeros((r, r))
    min_d = np.zeros((r, r))
    shared = []
    edges = []
    for a in range(r):
        for b in range(a + 1, r):
            d = cdist(mu[a], mu[b])  # (K, K)
            rows, cols = linear_sum_assignment(d)
            mean_d[a, b] = mean_d[b, a] = d[rows, cols].mean()
            max_d[a, b] = max_d[b, a] = d[rows, cols].max()
            min_d[a, b] = min_d[b, a] = d.min()
            if max_d[a, b] <= tol:
                edges.append((a, b))
            for j, kk in zip(*np.nonzero(d <= tol)):
                shared.append((a, int(j), b, int(kk), float(d[j, kk])))
    groups = [g for g in _components(r, edges) if len(g) >= 2]
    ari = None
    n_rows = 0
    if x is not None:
        if x.shape[0] > max_rows:
            x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], max_rows, replace=False))]
        n_rows = x.shape[0]
        labels = cs.hard_assignments(x)  # (R, m)
        ari = np.eye(r)
        for a in range(r):
            for b in range(a + 1, r):
                ari[a, b] = ari[b, a] = adjusted_rand_score(labels[a], labels[b])
    warns = []
    largest = max((len(g) for g in groups), default=1)
    if largest == r:
        warns.append(f"All {r} clusterings are (nearly) identical (matched centroids within tol={tol:.3g}): "
                     "diversity is nil and the method reduces to standard training (paper section 6.2).")
    elif largest >= max(2, math.ceil(0.75 * r)):
        warns.append(f"{largest} of {r} clusterings are (nearly) identical (matched centroids within tol={tol:.3g}): "
                     "diversity is low and the method nearly reduces to standard training (paper section 6.2).")
    elif ari is not None and r > 1 and np.median(ari[np.triu_indices(r, 1)]) >= 0.99:
        warns.append("The median pairwise adjusted Rand index is >= 0.99: the clusterings partition the data "
                     "(nearly) identically, so diversity is low (paper section 6.2).")
    n_pairs = len({(a, b) for a, _, b, _, _ in shared})
    if n_pairs:
        warns.append(f"{n_pairs} pair(s) of clusterings share a centroid within tol={tol:.3g}: for such a pair the "
                     "best constant reconstruction has historical loss delta* ~ 0 (claims.md T2).")
    return ClusteringAudit(ari=ari, centroid_dist=mean_d, matched_max_dist=max_d, min_pair_centroid_dist=min_d,
                           duplicate_groups=groups, shared_centroids=shared, warnings=warns, tol=float(tol),
                           scale=scale, n_rows=n_rows)
