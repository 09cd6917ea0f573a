"""Closed forms: the linear VAE's optimum against the decoder variance, and diffusion timesteps.

Linear VAE (paper 3.2 and 5.7; Lucas et al. 2019, Tipping & Bishop 1999 pPCA). With encoder
``q(z|x) = N(V x + c, diag(sigma^2))``, decoder ``N(W z + b, s2 I)`` and latent dim ``n``, the
ELBO's optimum is the pPCA maximum-likelihood solution restricted to fixed ``s2``: along the
``i``-th principal direction (eigenvalue ``lambda_i`` of the data covariance ``Sigma``, normalised
by ``1/n_samples``) the decoder column has ``||W_i||^2 = max(lambda_i - s2, 0)``. Hence dimension
``i`` (among the top ``n``) is active iff ``lambda_i > s2``, with

- posterior variance ``s2 / lambda_i`` (1 when inactive),
- ``Var_x(mu_i) = 1 - s2 / lambda_i`` (0 when inactive),
- ``KL_i = 0.5 log(lambda_i / s2)`` nats (0 when inactive),

and the negative ELBO per sample (nats) equals the pPCA negative log-likelihood,
``0.5 [N log(2 pi) + sum_active (log lambda_i + 1) + sum_inactive (log s2 + lambda_i / s2)]``,
where "inactive" runs over all ``N`` data dimensions that are not active.
``tests/test_theory.py`` derives each of these with sympy.

Diffusion (paper section 7, eq. 12-13): the forward process ``q(x_t|x_0) = N(sqrt(abar_t) x_0,
(1 - abar_t) I)`` and the critical timestep ``1 - abar_{t_c} = lambda_max``, next to the
signal-to-noise version ``abar_t lambda_max = 1 - abar_t``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal, Optional, Sequence

import numpy as np

from hcdiag.errors import InputError
from hcdiag.paper import AU_THRESHOLD  # Burda et al. (2015) active-unit threshold on Var_x(mu_j)

Schedule = Literal["linear", "cosine"]
SCHEDULES: tuple[str, ...] = ("linear", "cosine")
#: Largest latent dimension: the optimum holds one float per latent dimension (those beyond N are all inactive).
MAX_LATENT_DIM = 1 << 20
#: Largest number of diffusion steps (DDPM uses 1000): each schedule holds a few float64 arrays of length T.
MAX_T = 10**7


# ----------------------------------------------------------------------------- validation

def _positive_float(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"The '{name}' parameter must be a finite float > 0. Got {value!r}.") from None
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"The '{name}' parameter must be a finite float > 0. Got {value!r}.")
    return v


def _positive_int(value, name: str, minimum: int = 1, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise InputError(f"The '{name}' parameter must be an integer >= {minimum}. Got {value!r}.")
    if maximum is not None and int(value) > maximum:
        raise InputError(f"The '{name}' parameter must be an integer in [{minimum}, {maximum}]. Got {value!r}.")
    return int(value)


def _eigenvalues(eigenvalues) -> np.ndarray:
    """Validated eigenvalues, float64, sorted descending; round-off negatives clipped to 0."""
    try:
        lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError("The 'eigenvalues' parameter must be a 1-D array of numbers.") from None
    if lam.size == 0:
        raise InputError("The 'eigenvalues' parameter is empty; pass at least one eigenvalue of the data covariance.")
    if not np.all(np.isfinite(lam)):
        raise InputError(f"The 'eigenvalues' parameter holds {int((~np.isfinite(lam)).sum())} non-finite value(s); "
                         "recompute the spectrum from finite data.")
    lam = np.sort(lam)[::-1]
    # A covariance is PSD; eigensolvers return tiny negatives for zero eigenvalues.
    tol = 1e-10 * max(float(lam[0]), 1.0)
    if lam[-1] < -tol:
        raise InputError(f"The 'eigenvalues' parameter must be >= 0 (a covariance spectrum). Got {lam[-1]:.6g}.")
    return np.clip(lam, 0.0, None)


# ----------------------------------------------------------------------------- linear VAE

@dataclass(frozen=True)
class LinearVAEOptimum:
    """The linear VAE's optimum at decoder variance ``s2`` (paper 3.2; Lucas et al. 2019).

    Per-dimension arrays have shape ``(latent_dim,)`` and are ordered like the eigenvalues
    (descending). KL values are in nats, averaged over the data; ``neg_elbo`` and ``recon`` are
    per sample, in nats. ``recon = neg_elbo - kl`` is the expected Gaussian reconstruction NLL.
    ``eigenvalues`` are the top ``latent_dim`` eigenvalues used (0 past the data dimension N) and
    ``decoder_norm2`` the optimal squared decoder column norms ``max(lambda_i - s2, 0)``.
    """

    s2: float
    latent_dim: int
    N: int
    eigenvalues: np.ndarray
    active: np.ndarray
    posterior_var: np.ndarray
    mu_var: np.ndarray
    kl_per_dim: np.ndarray
    decoder_norm2: np.ndarray
    kl: float
    neg_elbo: float
    recon: float

    @property
    def n_active(self) -> int:
        """Number of active dimensions (``lambda_i > s2``)."""
        return int(self.active.sum())

    @property
    def au_burda(self) -> int:
        """Burda et al. active units: dimensions with ``Var_x(mu_i) > 0.01``."""
        return int((self.mu_var > AU_THRESHOLD).sum())

    def to_dict(self) -> dict:
        d = asdict(self)
        d = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in d.items()}
        d["n_active"] = self.n_active
        d["au_burda"] = self.au_burda
        return d


def linear_vae_optimum(eigenvalues, s2: float, latent_dim: int, *, trace: Optional[float] = None,
                       N: Optional[int] = None) -> LinearVAEOptimum:
    """Closed-form optimum of the linear VAE with fixed decoder variance ``s2``.

    Parameters
    ----------
    eigenvalues : array of shape (k,)
        Eigenvalues of the data covariance (``1/n`` normalised), either the full spectrum
        (``k = N``) or the top ``k >= latent_dim`` of them. Sorted here, descending.
    s2 : float > 0
        Decoder variance (the paper's sigma'^2), in squared data units.
    latent_dim : int >= 1
        Latent dimension ``n``.
    trace, N : float, int
        ``tr Sigma`` and the data dimension. Needed when only the top eigenvalues are given
        (the inactive dimensions enter ``neg_elbo`` only through ``trace - sum_active lambda``);
        default to ``sum(eigenvalues)`` and ``len(eigenvalues)`` (full spectrum).

    Examples
    --------
    >>> opt = linear_vae_optimum([4.0, 2.0, 0.5], s2=1.0, latent_dim=2)
    >>> opt.active.tolist(), round(opt.kl, 6)
    ([True, True], 1.039721)
    """
    lam = _eigenvalues(eigenvalues)
    s2 = _positive_float(s2, "s2")
    n = _positive_int(latent_dim, "latent_dim", maximum=MAX_LATENT_DIM)
    k = lam.size
    if N is None:
        N = k
        if trace is None:
            trace = float(lam.sum())
        elif not math.isclose(float(trace), float(lam.sum()), rel_tol=1e-6, abs_tol=1e-12):
            raise InputError("The 'N' parameter is required when 'trace' is given for a partial spectrum; "
                             "pass N (the data dimension) too.")
    else:
        N = _positive_int(N, "N")
        if k > N:
            raise InputError(f"The 'N' parameter ({N}) is smaller than the number of eigenvalues given ({k}).")
        if trace is None:
            if k != N:
                raise InputError(f"The 'trace' parameter is required when only the top {k} of N={N} eigenvalues "
                                 "are given; pass trace = tr(Sigma).")
            trace = float(lam.sum())
    trace = float(trace)
    if not math.isfinite(trace) or trace < 0:
        raise InputError(f"The 'trace' parameter must be a finite float >= 0. Got {trace!r}.")
    if trace < lam.sum() * (1 - 1e-9) - 1e-12:
        raise InputError(f"The 'trace' parameter ({trace:.6g}) is smaller than the sum of the eigenvalues given "
                         f"({lam.sum():.6g}); pass tr(Sigma) of the same covariance.")
    if k < n and k < N:
        raise InputError(f"The 'eigenvalues' parameter has {k} value(s) but latent_dim={n} needs the top {n} "
                         f"(or the full spectrum of all N={N}); compute more eigenvalues.")

    # Latent dims beyond the N data dimensions (n > N) see lambda = 0: always inactive.
    top = np.zeros(n)
    m = min(n, k)
    top[:m] = lam[:m]
    active = top > s2
    ratio = np.where(active, s2 / np.where(active, top, 1.0), 1.0)
    posterior_var = ratio                                   # s2 / lambda_i, 1 when inactive
    mu_var = 1.0 - ratio                                    # 1 - s2 / lambda_i, 0 when inactive
    kl_per_dim = np.where(active, -0.5 * np.log(ratio), 0.0)  # 0.5 log(lambda_i / s2)
    decoder_norm2 = np.where(active, top - s2, 0.0)          # ||W_i||^2 = max(lambda_i - s2, 0)
    kl = float(kl_per_dim.sum())

    # pPCA negative log-likelihood per sample = neg ELBO at the optimum (Tipping & Bishop eq. 4,
    # C = W W^T + s2 I has eigenvalues lambda_i (active) and s2 (all other N - n_active dims)).
    lam_act = top[active]
    n_inactive = N - lam_act.size
    sum_inactive = max(trace - float(lam_act.sum()), 0.0)
    neg_elbo = 0.5 * (N * math.log(2 * math.pi) + float(np.sum(np.log(lam_act) + 1.0))
                      + n_inactive * math.log(s2) + sum_inactive / s2)
    return LinearVAEOptimum(s2=s2, latent_dim=n, N=int(N), eigenvalues=top, active=active,
                            posterior_var=posterior_var, mu_var=mu_var, kl_per_dim=kl_per_dim,
                            decoder_norm2=decoder_norm2, kl=kl, neg_elbo=float(neg_elbo),
                            recon=float(neg_elbo - kl))


def _multiples(multiples) -> list[float]:
    if np.isscalar(multiples):
        multiples = [multiples]
    vals = []
    for m in multiples:
        try:
            v = float(m)
        except (TypeError, ValueError):
            v = float("nan")
        if not math.isfinite(v) or v <= 0:
            raise InputError(f"The 'multiples' parameter must hold floats > 0 (s2 = multiple * lambda_max). Got {m!r}.")
        vals.append(v)
    if not vals:
        raise InputError("The 'multiples' parameter must hold at least one float > 0.")
    return vals


def phase_table(eigenvalues, multiples: Sequence[float], latent_dim: int, *, trace: Optional[float] = None,
                N: Optional[int] = None, lambda_max: Optional[float] = None) -> list[dict]:
    """The linear VAE's optimum at ``s2 = m * lambda_max`` for each multiple ``m`` (paper 5.7).

    ``eigenvalues``, ``trace`` and ``N`` as in :func:`linear_vae_optimum`; ``lambda_max``
    defaults to the largest eigenvalue. One row per multiple, with keys ``multiple``, ``s2``,
    ``active`` (count of ``lambda_i > s2``), ``active_dims`` (0-based indices into the descending
    spectrum), ``kl`` (total, nats), ``kl_per_dim`` (nats), ``neg_elbo`` (nats per sample),
    ``recon`` (nats per sample) and ``au_burda`` (dims with ``Var_x(mu) > 0.01``).

    >>> [r["active"] for r in phase_table([4.0, 2.0, 0.5], [0.25, 1.0], 2)]
    [2, 0]
    """
    lam = _eigenvalues(eigenvalues)
    lmax = float(lam[0]) if lambda_max is None else _positive_float(lambda_max, "lambda_max")
    if lmax <= 0:
        raise InputError("The largest eigenvalue is 0 (constant data); the phase table needs lambda_max > 0.")
    rows = []
    for m in _multiples(multiples):
        opt = linear_vae_optimum(lam, m * lmax, latent_dim, trace=trace, N=N)
        rows.append({
            "multiple": m,
            "s2": opt.s2,
            "active": opt.n_active,
            "active_dims": [int(i) for i in np.flatnonzero(opt.active)],
            "kl": opt.kl,
            "kl_per_dim": opt.kl_per_dim.tolist(),
            "neg_elbo": opt.neg_elbo,
            "recon": opt.recon,
            "au_burda": opt.au_burda,
        })
    return rows


def critical_multiple(eigenvalues, *, lambda_max: Optional[float] = None) -> float:
    """The smallest multiple ``m`` at which the optimum's KL is 0: ``lambda_1 / lambda_max``.

    KL(s2) > 0 iff some ``lambda_i > s2``, so it first vanishes at ``s2 = lambda_1``; with
    ``lambda_max = lambda_1`` (the default) this is exactly 1, the paper's collapse threshold
    ``sigma'^2 = lambda_max`` (3.2). It differs from 1 only when ``lambda_max`` is another estimate.

    >>> critical_multiple([4.0, 2.0])
    1.0
    """
    lam = _eigenvalues(eigenvalues)
    lmax = float(lam[0]) if lambda_max is None else _positive_float(lambda_max, "lambda_max")
    if lmax <= 0:
        raise InputError("The largest eigenvalue is 0 (constant data); there is no critical multiple.")
    return float(lam[0] / lmax)


# ----------------------------------------------------------------------------- diffusion

def _check_schedule(schedule) -> str:
    if schedule not in SCHEDULES:
        raise InputError(f"The 'schedule' parameter must be one of {', '.join(SCHEDULES)}. Got {schedule!r}.")
    return schedule


def betas(schedule: Schedule = "linear", T: int = 1000) -> np.ndarray:
    """Noise schedule ``beta_t`` for ``t = 1..T``, shape (T,), float64.

    ``linear``: ``T`` values evenly spaced from 1e-4 to 0.02 (Ho et al. 2020, who use T = 1000;
    the endpoints are kept for other T, not rescaled). ``cosine``: Nichol & Dhariwal (2021) eq. 17,
    ``abar(t) = f(t)/f(0)``, ``f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)``, ``s = 0.008``,
    ``beta_t = 1 - abar(t)/abar(t-1)`` clipped at 0.999.
    """
    from hcdiag.diffusion.schedules import Schedule

    _check_schedule(schedule)
    T = _positive_int(T, "T", minimum=2, maximum=MAX_T)
    return Schedule(schedule, T).betas()  # the schedules' one definition (hcdiag.diffusion.schedules)


def alphabar(schedule: Schedule = "linear", T: int = 1000) -> np.ndarray:
    """``abar_t = prod_{s<=t} (1 - beta_s)`` for ``t = 1..T``, shape (T,), float64, decreasing."""
    return np.cumprod(1.0 - betas(schedule, T))


@dataclass(frozen=True)
class DiffusionTimestep:
    """Critical timesteps of one noise schedule for a data covariance with top eigenvalue ``lambda_max``.

    ``t_c``: the first ``t`` (1-based) with ``1 - abar_t >= lambda_max`` (eq. 13), ``t_c_frac``
    the fractional ``t`` where the linear interpolation of ``1 - abar`` between steps equals
    ``lambda_max``; both ``None`` with ``t_c_reason`` when ``lambda_max`` lies outside
    ``noise_range = [1 - abar_1, 1 - abar_T]``. ``t_snr``: the first ``t`` with
    ``abar_t lambda_max <= 1 - abar_t`` (signal variance along the top direction no larger than
    the noise variance; equality at ``abar = 1/(1 + lambda_max)``), ``t_snr_frac`` interpolated in
    ``abar``; ``None`` with ``t_snr_reason`` when ``1/(1 + lambda_max)`` lies outside
    ``[abar_T, abar_1]``.
    """

    schedule: str
    T: int
    lambda_max: float
    noise_range: tuple[float, float]
    t_c: Optional[int]
    t_c_frac: Optional[float]
    t_c_reason: Optional[str]
    t_snr: Optional[int]
    t_snr_frac: Optional[float]
    t_snr_reason: Optional[str]
    alphabar_snr: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["noise_range"] = list(self.noise_range)
        return d


def _first_crossing(g: np.ndarray, target: float) -> tuple[int, float]:
    """First 1-based t with ``g_t >= target`` for increasing ``g`` (shape (T,)), and the
    fractional t of the linear interpolation; assumes ``g_1 <= target <= g_T``."""
    i = int(np.argmax(g >= target))  # 0-based
    if i == 0:
        return 1, 1.0
    lo, hi = g[i - 1], g[i]
    frac = i + (target - lo) / (hi - lo) if hi > lo else float(i + 1)
    return i + 1, float(frac)


def critical_timestep(lambda_max: float, schedule: Schedule = "linear", T: int = 1000) -> DiffusionTimestep:
    """Critical timestep ``1 - abar_{t_c} = lambda_max`` (paper eq. 13) and the SNR timestep.

    ``lambda_max`` is the largest eigenvalue of the data covariance in the units the diffusion
    model sees (DDPM scales images to [-1, 1]). Since ``1 - abar_t < 1``, ``t_c`` never exists
    for ``lambda_max >= 1``; the SNR timestep exists whenever ``1/(1 + lambda_max)`` lies in the
    schedule's range of ``abar``.

    >>> critical_timestep(0.5).t_c
    260
    >>> critical_timestep(2.0).t_c is None
    True
    """
    lmax = _positive_float(lambda_max, "lambda_max")
    schedule = _check_schedule(schedule)
    T = _positive_int(T, "T", minimum=2, maximum=MAX_T)
    ab = alphabar(schedule, T)
    g = 1.0 - ab  # noise variance, increasing in t
    lo, hi = float(g[0]), float(g[-1])
    t_c = t_c_frac = reason = None
    if lmax >= 1.0:
        reason = (f"lambda_max = {lmax:.6g} >= 1 but the noise variance 1 - alphabar_t < 1 for every t: "
                  "eq. 13 has no solution in any schedule (rescale the data, e.g. to [-1, 1], or use the SNR timestep)")
    elif lmax > hi:
        reason = (f"lambda_max = {lmax:.6g} exceeds the largest noise variance 1 - alphabar_T = {hi:.6g} "
                  f"of the {schedule} schedule with T={T}")
    elif lmax < lo:
        reason = (f"lambda_max = {lmax:.6g} is below the smallest noise variance 1 - alphabar_1 = {lo:.6g} "
                  f"of the {schedule} schedule: the noise exceeds it from the first step")
    else:
        t_c, t_c_frac = _first_crossing(g, lmax)

    a_snr = 1.0 / (1.0 + lmax)  # abar * lambda_max = 1 - abar
    t_snr = t_snr_frac = snr_reason = None
    if a_snr > ab[0]:
        snr_reason = (f"alphabar = 1/(1 + lambda_max) = {a_snr:.6g} is above alphabar_1 = {ab[0]:.6g}: "
                      "the signal-to-noise ratio is below 1 from the first step")
    elif a_snr < ab[-1]:
        snr_reason = (f"alphabar = 1/(1 + lambda_max) = {a_snr:.6g} is below alphabar_T = {ab[-1]:.6g}: "
                      f"the signal-to-noise ratio stays above 1 up to T={T}")
    else:
        t_snr, t_snr_frac = _first_crossing(-ab, -a_snr)
    return DiffusionTimestep(schedule=schedule, T=T, lambda_max=lmax, noise_range=(lo, hi), t_c=t_c,
                             t_c_frac=t_c_frac, t_c_reason=reason, t_snr=t_snr, t_snr_frac=t_snr_frac,
                             t_snr_reason=snr_reason, alphabar_snr=a_snr)
