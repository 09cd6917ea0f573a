"""Sample-quality metrics for a diffusion model's samples (section 7): energy distances with a noise floor and
bootstrap intervals, and, where the data's true law is a known Gaussian mixture, exact log-densities and mode
coverage.

Conventions. Arrays are rows ``(n, d)``, computed in float64; ``||.||`` is the Euclidean norm.

*Energy distance* (Szekely & Rizzo 2013). For samples ``a`` (n rows) and ``b`` (m rows),

    ED(a, b) = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||,

each E the mean over *all* pairs of rows: ``n m`` cross pairs, ``n^2`` and ``m^2`` within pairs, the diagonal
``i = j`` (distance 0) included. This is the V-statistic: the energy distance between the two empirical
distributions, hence >= 0 (up to rounding) and 0 for identical arrays. It is the *squared* energy distance:
in 1-D, ``scipy.stats.energy_distance(u, v) ** 2`` (scipy returns its square root, also a V-statistic).
The diagonal makes it biased upward: for two samples of one law, ``E[ED] = mu (1/n + 1/m)`` with
``mu = E||X - X'||``, which is why a sample is judged against a *noise floor* of the same size, never against 0.

*Noise floor* (:func:`energy_test`). ``floor = ED(train, heldout)`` with ``train`` as many training rows as there
are samples: what a generator that draws fresh rows of the data law (and memorised nothing) scores, up to sampling
noise. ``excess = ED(samples, heldout) - floor``; the V-statistic biases of the two terms cancel when both have
the same number of rows, which :func:`energy_test` therefore requires. So does :func:`paired_difference` for the
two sample sets it compares.

*Bootstrap.* Percentile intervals (``numpy.percentile`` at 2.5 and 97.5, linear interpolation) over ``n_boot``
replicates; a replicate resamples the rows of each array with replacement (``numpy.random.default_rng(seed)``).
A resample is a count vector ``w`` (row i drawn ``w_i`` times), and a V-statistic mean over pairs of two resamples
is exactly ``w^T D v / (sum w sum v)`` with ``D`` the pairwise distance matrix of the original rows; so ``D`` is
computed once and each replicate is a few matrix-vector products (batched into matrix products). Memory is
O(n^2): 8 bytes per pair in the blocks kept (:func:`energy_test`: 5 blocks, 160 MB at 2000 rows per array).
Replicates are drawn in batches of up to ``_BOOT_BATCH`` (256); within a batch of ``b`` replicates the row
indices are ``rng.integers(0, n, (b, n))`` for each array in argument order (:func:`energy_test`: samples,
heldout, train; :func:`paired_difference`: samples_a, samples_b, heldout), which reproduces the intervals by hand.
The same heldout resample enters both terms of ``excess`` and of ``diff``, so the heldout noise they share cancels
(the ``E||Y - Y'||`` term cancels exactly). The resampled within terms lose the pairs a resample duplicates, so
``ed_ci`` and ``floor_ci`` sit above their point estimates by about ``mu (1/n + 1/m)`` when ED is itself of that
size (samples close to the data); that bias cancels in ``excess_ci`` and ``diff_ci``, which are the ones to read.

:func:`energy_distance` alone stores no n x m matrix: it sums distances in chunks of at most ``_CHUNK_BYTES``
(32 MiB), so 5000 x 5000 rows in d = 64 stay far below 200 MB.

*Gaussian mixture* (:func:`gmm_loglik`, :func:`mode_coverage`). ``K`` isotropic components ``N(mu_k, s^2 I)``
(``means`` (K, d), common ``spread`` s), weights ``pi_k`` (equal unless given):

    log p(x) = logsumexp_k [log pi_k - ||x - mu_k||^2 / (2 s^2)] - (d / 2) log(2 pi s^2).

*Mode coverage.* With equal weights and a common spread the most probable component of a row is its nearest mean.
For a row of component k, ``||x - mu_k|| / s`` follows a chi distribution with d degrees of freedom: mean about
``sqrt(d)`` (``sqrt(d - 1/2)``), standard deviation about ``1 / sqrt(2)`` for every d. A row is *high quality* when
``||x - mu_k|| <= s (sqrt(d) + radius)`` for its nearest mean: at the default ``radius = 3`` (over four standard
deviations above the typical distance) a true row fails with probability below 7e-5 in any dimension (chi tail;
1.3e-5 at d = 3072), while a row off the mixture's shells fails. Component k is *covered* when it received at least
a quarter of its expected share of high-quality rows: ``counts[k] >= 0.25 n / K`` (n all rows). ``kl_modes`` is
``KL(p || uniform) = sum_k p_k log(K p_k)`` (natural log, ``0 log 0 = 0``) of the histogram ``p`` of nearest-mean
assignments of all rows: 0 for balanced modes, ``log(K / j)`` when j modes share the rows evenly.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.distance import cdist
from scipy.special import logsumexp

from hcdiag.errors import InputError

_CHUNK_BYTES = 32 * 2**20  # the largest block of distances energy_distance holds at once
_BOOT_BATCH = 256  # replicates per batch of the bootstrap
_MIN_BOOT = 20


def _rows(fn: str, name: str, x, min_rows: int) -> np.ndarray:
    """``x`` as a float64 (n, d) array with finite values and at least ``min_rows`` rows, else InputError."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{fn}: {name} must be a numeric (n, d) array; got {type(x).__name__}.") from None
    if a.ndim != 2 or a.shape[1] < 1:
        raise InputError(f"{fn}: {name} must be an (n, d) array of rows; got shape {a.shape} (reshape a 1-D sample "
                         "to (n, 1)).")
    if a.shape[0] < min_rows:
        raise InputError(f"{fn} needs at least {min_rows} row{'s' * (min_rows > 1)} in {name}; got {a.shape[0]}.")
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        raise InputError(f"{fn}: {name} holds non-finite values (NaN or inf) in {int(bad.sum())} of {a.shape[0]} "
                         "rows; drop or fix those rows first.")
    return a


def _same_d(fn: str, arrays: dict[str, np.ndarray]) -> None:
    if len({a.shape[1] for a in arrays.values()}) > 1:
        shapes = " and ".join(f"{k} {a.shape}" for k, a in arrays.items())
        raise InputError(f"{fn} needs (n, d) arrays with the same d; got {shapes}.")


def _n_boot(fn: str, n_boot) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < _MIN_BOOT:
        raise InputError(f"{fn}: n_boot must be an integer >= {_MIN_BOOT} (fewer replicates cannot place the 2.5% "
                         f"tails of a 95% interval); got {n_boot!r}.")
    return int(n_boot)


def _sum_dist(a: np.ndarray, b: np.ndarray | None) -> float:
    """The sum of ``||a_i - b_j||`` over all pairs (``b`` None: over all ordered pairs of ``a``, diagonal included),
    in blocks of at most ``_CHUNK_BYTES``."""
    m = a.shape[0] if b is None else b.shape[0]
    step = max(1, _CHUNK_BYTES // (8 * m))
    total = 0.0
    for i in range(0, a.shape[0], step):
        blk = a[i:i + step]
        if b is None:  # symmetric: the diagonal square once, the rows to its right twice
            total += float(cdist(blk, blk).sum())
            if i + step < m:
                total += 2.0 * float(cdist(blk, a[i + step:]).sum())
        else:
            total += float(cdist(blk, b).sum())
    return total


def energy_distance(a, b) -> float:
    """The squared energy distance ``2 E||X - Y|| - E||X - X'|| - E||Y - Y'||`` of the rows of ``a`` (n, d) and
    ``b`` (m, d): the V-statistic, every mean over all pairs including ``i = j`` (module docstring). Distances are
    summed in chunks, never held as an n x m matrix."""
    fn = "energy_distance"
    a, b = _rows(fn, "a", a, 2), _rows(fn, "b", b, 2)
    _same_d(fn, {"a": a, "b": b})
    n, m = a.shape[0], b.shape[0]
    return 2.0 * _sum_dist(a, b) / (n * m) - _sum_dist(a, None) / n**2 - _sum_dist(b, None) / m**2


def _counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """Count vectors (b, n) of ``b`` resamples of n rows with replacement (``rng.integers(0, n, (b, n))``)."""
    idx = rng.integers(0, n, (b, n))
    flat = (idx + n * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def _pair_mean(D: np.ndarray, wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """Per replicate r, the mean of ``D`` over all pairs of the resamples with counts ``wx[r]``, ``wy[r]``:
    ``wx D wy / (sum wx sum wy)`` (exact for the V-statistic)."""
    return np.einsum("ri,ri->r", wx @ D, wy) / (wx.sum(1) * wy.sum(1))


def _ed_boot(Dxy, Dxx, Dyy, wx, wy) -> np.ndarray:
    """Per replicate, the energy distance of the resamples ``wx`` (of x) and ``wy`` (of y); ``Dyy`` None leaves out
    the ``E||Y - Y'||`` term (it cancels in a difference sharing the y resample)."""
    out = 2.0 * _pair_mean(Dxy, wx, wy) - _pair_mean(Dxx, wx, wx)
    return out if Dyy is None else out - _pair_mean(Dyy, wy, wy)


def _ci(reps: np.ndarray) -> list[float]:
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return [float(lo), float(hi)]


def energy_test(samples, heldout, train, *, n_boot: int = 200, seed=0) -> dict:
    """The energy distance of ``samples`` to ``heldout`` against its noise floor (module docstring).

    ``train``: training rows, as many as ``samples`` (a random subsample of the training set, drawn by the caller).
    Returns plain floats and lists: ``ed`` = ED(samples, heldout), ``floor`` = ED(train, heldout), ``excess`` =
    ``ed - floor``, each with a percentile bootstrap 95% interval (``ed_ci``, ``floor_ci``, ``excess_ci``), and
    ``n_boot``. ``excess_ci`` resamples samples, train and heldout in each replicate, the same heldout resample in
    both terms. Memory: five distance blocks of 8 bytes per pair (O(n^2))."""
    fn = "energy_test"
    S, H, T = _rows(fn, "samples", samples, 2), _rows(fn, "heldout", heldout, 2), _rows(fn, "train", train, 2)
    _same_d(fn, {"samples": S, "heldout": H, "train": T})
    if T.shape[0] != S.shape[0]:
        raise InputError(f"{fn} needs train with as many rows as samples (the floor's V-statistic bias depends on "
                         f"n); got {T.shape[0]} and {S.shape[0]}: pass a random subsample of {S.shape[0]} training "
                         "rows.")
    n_boot = _n_boot(fn, n_boot)
    rng = np.random.default_rng(seed)
    Dsh, Dss, Dhh, Dth, Dtt = cdist(S, H), cdist(S, S), cdist(H, H), cdist(T, H), cdist(T, T)
    ehh = Dhh.mean()
    ed = float(2.0 * Dsh.mean() - Dss.mean() - ehh)
    floor = float(2.0 * Dth.mean() - Dtt.mean() - ehh)
    eds, floors = [], []
    for start in range(0, n_boot, _BOOT_BATCH):
        b = min(_BOOT_BATCH, n_boot - start)
        ws, wh, wt = _counts(rng, b, S.shape[0]), _counts(rng, b, H.shape[0]), _counts(rng, b, T.shape[0])
        hh = _pair_mean(Dhh, wh, wh)
        eds.append(_ed_boot(Dsh, Dss, None, ws, wh) - hh)
        floors.append(_ed_boot(Dth, Dtt, None, wt, wh) - hh)
    eds, floors = np.concatenate(eds), np.concatenate(floors)
    return {"ed": ed, "ed_ci": _ci(eds), "floor": floor, "floor_ci": _ci(floors), "excess": ed - floor,
            "excess_ci": _ci(eds - floors), "n_boot": n_boot}


def paired_difference(samples_a, samples_b, heldout, *, n_boot: int = 200, seed=0) -> dict:
    """``diff = ED(samples_a, heldout) - ED(samples_b, heldout)`` with a percentile bootstrap 95% interval
    ``diff_ci``, each replicate resampling a, b and heldout, the same heldout resample in both terms (the heldout
    noise they share cancels; ``E||Y - Y'||`` cancels exactly). ``samples_a`` and ``samples_b`` must have as many
    rows as each other (so their V-statistic biases cancel). Returns plain floats and lists: ``diff``, ``diff_ci``,
    ``ed_a``, ``ed_b``, ``n_boot``. Memory: four distance blocks of 8 bytes per pair (O(n^2))."""
    fn = "paired_difference"
    A, B = _rows(fn, "samples_a", samples_a, 2), _rows(fn, "samples_b", samples_b, 2)
    H = _rows(fn, "heldout", heldout, 2)
    _same_d(fn, {"samples_a": A, "samples_b": B, "heldout": H})
    if A.shape[0] != B.shape[0]:
        raise InputError(f"{fn} needs samples_a and samples_b with the same number of rows (the V-statistic bias "
                         f"depends on n); got {A.shape[0]} and {B.shape[0]}: subsample the larger one.")
    n_boot = _n_boot(fn, n_boot)
    rng = np.random.default_rng(seed)
    Dah, Daa, Dbh, Dbb = cdist(A, H), cdist(A, A), cdist(B, H), cdist(B, B)
    ehh = _sum_dist(H, None) / H.shape[0] ** 2
    ed_a = float(2.0 * Dah.mean() - Daa.mean() - ehh)
    ed_b = float(2.0 * Dbh.mean() - Dbb.mean() - ehh)
    diffs = []
    for start in range(0, n_boot, _BOOT_BATCH):
        b = min(_BOOT_BATCH, n_boot - start)
        wa, wb, wh = _counts(rng, b, A.shape[0]), _counts(rng, b, B.shape[0]), _counts(rng, b, H.shape[0])
        diffs.append(_ed_boot(Dah, Daa, None, wa, wh) - _ed_boot(Dbh, Dbb, None, wb, wh))
    return {"diff": ed_a - ed_b, "diff_ci": _ci(np.concatenate(diffs)), "ed_a": ed_a, "ed_b": ed_b,
            "n_boot": n_boot}


def _mixture(fn: str, x, means, spread) -> tuple[np.ndarray, np.ndarray, float]:
    x = _rows(fn, "x", x, 1)
    try:
        mu = np.asarray(means, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{fn}: means must be a numeric (K, d) array; got {type(means).__name__}.") from None
    if mu.ndim != 2 or mu.shape[0] < 1 or mu.shape[1] != x.shape[1]:
        raise InputError(f"{fn} needs means of shape (K, d) with K >= 1 and d = {x.shape[1]} (the columns of x); "
                         f"got {mu.shape}.")
    if not np.isfinite(mu).all():
        raise InputError(f"{fn}: means hold non-finite values (NaN or inf); fix them first.")
    try:
        s = float(spread)
    except (TypeError, ValueError):
        s = float("nan")
    if not (math.isfinite(s) and s > 0):
        raise InputError(f"{fn} needs a finite spread > 0 (the components' common standard deviation); got "
                         f"{spread!r}.")
    return x, mu, s


def gmm_loglik(x, means, spread, weights=None) -> np.ndarray:
    """Per row of ``x`` (n, d), the exact log-density (natural log) under the mixture of ``N(means[k], spread^2
    I)`` with ``weights`` (K,) (equal when None; non-negative, not all zero, normalised to sum 1). Shape (n,)."""
    fn = "gmm_loglik"
    x, mu, s = _mixture(fn, x, means, spread)
    K, d = mu.shape
    if weights is None:
        logw = np.full(K, -math.log(K))
    else:
        try:
            w = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError):
            w = np.full(1, np.nan)
        if w.shape != (K,) or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
            raise InputError(f"{fn} needs weights of shape ({K},), finite, non-negative and not all zero; got "
                             f"{np.shape(weights)} {np.ravel(w)[:5].tolist()}.")
        with np.errstate(divide="ignore"):
            logw = np.log(w / w.sum())
    sq = cdist(x, mu, "sqeuclidean")
    return logsumexp(logw - sq / (2.0 * s * s), axis=1) - 0.5 * d * math.log(2.0 * math.pi * s * s)


def mode_coverage(x, means, spread, *, radius: float = 3.0) -> dict:
    """Mode coverage of the rows ``x`` (n, d) under the equal-weight mixture of ``N(means[k], spread^2 I)``
    (module docstring): each row goes to its nearest mean (ties: the lowest k) and is high quality when within
    ``spread * (sqrt(d) + radius)`` of it. Returns ``counts`` (K high-quality rows per component), ``covered``
    (components with ``counts[k] >= 0.25 n / K``), ``K``, ``high_quality`` (fraction of rows), ``assigned`` (K rows
    per component, all rows) and ``kl_modes`` (KL of the ``assigned`` histogram to uniform, natural log)."""
    fn = "mode_coverage"
    x, mu, s = _mixture(fn, x, means, spread)
    try:
        r = float(radius)
    except (TypeError, ValueError):
        r = float("nan")
    if not (math.isfinite(r) and r >= 0):
        raise InputError(f"{fn} needs a finite radius >= 0 (in units of spread, beyond sqrt(d)); got {radius!r}.")
    (n, d), K = x.shape, mu.shape[0]
    dist = cdist(x, mu)
    k = dist.argmin(axis=1)
    hq = dist[np.arange(n), k] <= s * (math.sqrt(d) + r)
    counts = np.bincount(k[hq], minlength=K)
    assigned = np.bincount(k, minlength=K)
    p = assigned[assigned > 0] / n
    return {"counts": counts.tolist(), "covered": int((counts >= 0.25 * n / K).sum()), "K": int(K),
            "high_quality": float(hq.mean()), "assigned": assigned.tolist(),
            "kl_modes": float(np.sum(p * np.log(K * p)))}


__all__ = ["energy_distance", "energy_test", "gmm_loglik", "mode_coverage", "paired_difference"]
