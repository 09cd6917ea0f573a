"""The critical timestep measured on a diffusion model (section 7.4, prediction 1; check D1's kernel; issue 14).

"For t > t_c the reverse process becomes independent of x_t": measured on the posterior mean E[x_0 | x_t] (not on
eps-hat, whose Jacobian tends to the identity at high noise) along a direction v of the data (the top covariance
direction), as the *normalized gain*

    G(t) = sqrt(abar_t) v^T (d E[x_0 | x_t] / d x_t) v = 1 - sqrt(1 - abar_t) v^T (d eps_hat / d x_t) v,

the gain of E[x_0 | x_t] with respect to ``y = x_t / sqrt(abar_t)`` (x_0 plus noise of variance 1 / SNR). The
second form is exact (Tweedie) and well conditioned: an error in the eps Jacobian enters times
``sqrt(1 - abar_t) <= 1``, whereas E[x_0 | x_t] itself divides the eps error by ``sqrt(abar_t)`` (x590 at t = 1000
of the DDPM schedule). For Gaussian data with variance ``lambda`` along v the exact value is ``SNR lambda / (1 +
SNR lambda)``, which crosses 1/2 where ``SNR(t) lambda = 1``; eq. 13's criterion is ``1 - abar_t = lambda``.
The quadratic form v^T J v comes from one backward pass (the gradient of <v, eps_hat> dotted with v), averaged over points x_t drawn from the
forward process of data rows.
"""

from __future__ import annotations

import numpy as np
import torch

from hcdiag.diffusion.model import EpsFn, Tables
from hcdiag.errors import InputError


def normalized_gain(eps: EpsFn, tab: Tables, x0: torch.Tensor, v: torch.Tensor, ts, *,
                    generator: torch.Generator | None = None, with_se: bool = False):
    """``G(t)`` (module docstring) at each timestep of ``ts`` (1..T), averaged over the rows ``x0`` (n, d) each
    noised once to x_t; ``v`` (d,) a unit direction. ``with_se``: also the standard error of each mean over the
    rows (``(gain, se)``)."""
    x0 = torch.as_tensor(x0, dtype=torch.float64)
    v = torch.as_tensor(v, dtype=torch.float64)
    if x0.ndim != 2 or v.shape != (x0.shape[1],):
        raise InputError(f"normalized_gain needs rows (n, d) and a direction (d,); got {tuple(x0.shape)} and "
                         f"{tuple(v.shape)}.")
    nv = float(v.norm())
    if not nv > 0:
        raise InputError("The direction v must be non-zero.")
    v = v / nv
    out, se = [], []
    for t in ts:
        t = int(t)
        if not 1 <= t <= tab.T:
            raise InputError(f"Timesteps must lie in 1..T = {tab.T}; got {t}.")
        a = tab.abar[t]
        e = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * e
        tt = torch.full((x0.shape[0],), t, dtype=torch.long)
        vv = v.expand_as(xt)
        xg = xt.clone().requires_grad_(True)
        with torch.enable_grad():
            # v^T J v = v^T J^T v: the gradient of sum_i <v, eps(x_i)> (rows are independent), dotted with v
            (grad,) = torch.autograd.grad((eps(xg, tt) * vv).sum(), xg)
        per_row = 1.0 - (1 - a).sqrt() * (grad.detach() * vv).sum(1)
        out.append(float(per_row.mean()))
        se.append(float(per_row.std() / np.sqrt(per_row.numel())) if per_row.numel() > 1 else float("inf"))
    return (np.asarray(out), np.asarray(se)) if with_se else np.asarray(out)


def gaussian_gain(lam: float, tab: Tables, ts) -> np.ndarray:
    """The exact normalized gain ``SNR(t) lam / (1 + SNR(t) lam)`` of Gaussian data with variance ``lam``."""
    snr = np.array([float(tab.abar[int(t)] / (1 - tab.abar[int(t)])) for t in ts])
    return snr * lam / (1 + snr * lam)


def crossing(ts, g, level: float = 0.5) -> float | None:
    """The first timestep at which ``g`` falls to ``level`` (linear interpolation between the two timesteps that
    bracket it), or None when it never does; ``ts`` increasing."""
    ts, g = np.asarray(ts, dtype=float), np.asarray(g, dtype=float)
    below = np.nonzero(g <= level)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(ts[0])
    t0, t1, g0, g1 = ts[i - 1], ts[i], g[i - 1], g[i]
    return float(t0 + (g0 - level) / (g0 - g1) * (t1 - t0))


def crossing_log_snr(ts, g, log_snr, level: float = 0.5) -> float | None:
    """The log SNR at which ``g`` first falls to ``level``: between the two grid timesteps that bracket it,
    ``logit(g)`` is interpolated linearly in log SNR (exact for Gaussian data, where ``logit G = log SNR + log
    lambda``; a linear interpolation in t misplaces it by more than a factor 2 in SNR across the coarse end of a
    geometric grid); None when ``g`` never falls to ``level``. ``log_snr``: the schedule's log SNR at ``ts``."""
    ts, g, ls = (np.asarray(a, dtype=float) for a in (ts, g, log_snr))
    below = np.nonzero(g <= level)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(ls[0])
    lo, hi = g[i - 1], g[i]
    if not (0 < hi < 1 and 0 < lo < 1):  # logit undefined (a measured gain may overshoot): interpolate g itself
        f = (lo - level) / (lo - hi)
    else:
        lg = lambda p: np.log(p / (1 - p))  # noqa: E731
        f = (lg(lo) - lg(level)) / (lg(lo) - lg(hi))
    return float(ls[i - 1] + f * (ls[i] - ls[i - 1]))


__all__ = ["crossing", "crossing_log_snr", "gaussian_gain", "normalized_gain"]
