"""Collapse metrics and clustering losses: pure functions on tensors (no I/O, no global state).

Every function accepts torch tensors or anything ``numpy.asarray`` reads; results stay on the
device of the inputs. Sums that decide a verdict (KL, active units, MI, MSE) run in float64;
:func:`sq_dists_to_centroids` and :func:`clustering_losses` keep the promoted dtype of their inputs
because they are also the training loop's hot path (pass float32 centroids there).

Definitions follow ``claims.md`` ("Notation" and "Collapse metrics"):

* clustering loss (paper eq. 8): ``l_C = mean_x min_k ||xhat(x) - mu_k^C||^2``;
* historical loss (Def. 4.1): ``L_S = max_{C in S} l_C``;
* KL: ``mean_x KL(q(z|x) || N(0, I))`` in nats, total and per latent dimension;
* active units: Burda et al. 2015 as He et al. 2019 ``calc_au`` (primary), and the paper's two
  variants (5.1.4 posterior variance < 0.99; 5.2 / Table 3 variance > 0.005), labelled;
* mutual information ``I_q(x; z)`` as He et al. 2019 ``calc_mi``;
* reconstruction MSE ``mean_x ||x - xhat||^2 / N``.

>>> import torch
>>> xhat = torch.zeros(4, 2); cents = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
>>> clustering_losses(xhat, cents).tolist()
[1.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from hcdiag.errors import InputError, marked
from hcdiag.claims import collapsed as is_collapsed
from hcdiag.paper import AU_THRESHOLD

__all__ = [
    "ActiveUnits",
    "CollapseMetrics",
    "active_units",
    "active_units_paper_variance",
    "active_units_posterior",
    "clustering_losses",
    "collapse_metrics",
    "historical_loss",
    "kl_per_dim",
    "kl_total",
    "mutual_information",
    "recon_mse",
    "sq_dists_to_centroids",
]



# ----------------------------------------------------------------------------------------------
# input conversion (shared by hcdiag.checks.*)

def as_tensor(x, *, name: str, ndim: int | None = None, shape: str = "", dtype=None,
              device=None) -> torch.Tensor:
    """``x`` as a floating torch tensor, checked for its number of dimensions.

    Numpy arrays and nested lists are converted (integers and booleans become float64); a tensor
    keeps its device unless ``device`` is given. ``shape`` documents the expected shape in the
    error message, e.g. ``"(R, K, N)"``.
    """
    if not isinstance(x, torch.Tensor):
        try:
            arr = np.asarray(x)
            if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
                raise TypeError(f"dtype {arr.dtype} is not numeric")
            x = torch.as_tensor(arr if arr.flags.writeable else arr.copy())
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"The '{name}' argument must be a numeric array{' of shape ' + shape if shape else ''}; "
                             f"it could not be read as one ({marked(exc)}).") from None
    if x.is_complex():
        raise InputError(f"The '{name}' argument must be real-valued; got dtype {x.dtype}.")
    if ndim is not None and x.dim() != ndim:
        raise InputError(f"The '{name}' argument must be a {ndim}-D array{' of shape ' + shape if shape else ''}; "
                         f"got shape {tuple(x.shape)}.")
    if dtype is not None:
        x = x.to(dtype)
    elif not x.is_floating_point():
        x = x.to(torch.float64)
    if device is not None:
        x = x.to(device)
    return x


def _need_rows(x: torch.Tensor, name: str, rows: int) -> None:
    if x.shape[0] < rows:
        raise InputError(f"The '{name}' argument has {x.shape[0]} row(s); at least {rows} are needed.")


def _same_shape(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"The '{na}' and '{nb}' arguments must have the same shape; got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")


# ----------------------------------------------------------------------------------------------
# clustering losses (eq. 8, Def. 4.1)

def sq_dists_to_centroids(xhat, centroids) -> torch.Tensor:
    """Squared Euclidean distances from every reconstruction to every centroid of every clustering.

    Parameters
    ----------
    xhat : tensor of shape (B, N)
        Reconstructions (data units).
    centroids : tensor of shape (R, K, N)
        K centroids for each of R clusterings.

    Returns
    -------
    tensor of shape (R, B, K), squared data units, clamped at 0, differentiable in both inputs,
    on ``xhat``'s device in the promoted dtype of the two inputs.

    One matrix product against all ``R*K`` centroids, ``||x||^2 - 2 x.mu + ||mu||^2``: no Python
    loop over clusterings and no ``torch.cdist`` (its backward is slow and its "mm" path is the
    same expansion anyway).
    """
    xhat = as_tensor(xhat, name="xhat", ndim=2, shape="(B, N)")
    centroids = as_tensor(centroids, name="centroids", ndim=3, shape="(R, K, N)")
    if xhat.shape[1] != centroids.shape[2]:
        raise InputError(f"The 'xhat' rows and the 'centroids' must have the same length N; got xhat "
                         f"{tuple(xhat.shape)} and centroids {tuple(centroids.shape)}.")
    dtype = torch.promote_types(xhat.dtype, centroids.dtype)
    xhat = xhat.to(dtype)
    centroids = centroids.to(device=xhat.device, dtype=dtype)
    r, k, n = centroids.shape
    flat = centroids.reshape(r * k, n)  # (R*K, N)
    x2 = (xhat * xhat).sum(1)  # (B,)
    m2 = (flat * flat).sum(1)  # (R*K,)
    d = torch.addmm(m2.unsqueeze(0), xhat, flat.t(), beta=1.0, alpha=-2.0)  # (B, R*K): ||mu||^2 - 2 x.mu
    d = d + x2.unsqueeze(1)
    return d.clamp_min(0).reshape(xhat.shape[0], r, k).permute(1, 0, 2)  # (R, B, K)


def clustering_losses(xhat, centroids, *, per_sample: bool = False) -> torch.Tensor:
    """Clustering losses of paper eq. 8 for all R clusterings at once.

    ``l_C = mean_x min_k ||xhat(x) - mu_k^C||^2``.

    Parameters
    ----------
    xhat : tensor of shape (B, N)
    centroids : tensor of shape (R, K, N)
    per_sample : bool
        Return the per-sample terms ``min_k ||xhat(x) - mu_k^C||^2`` of shape (R, B) instead of
        their mean.

    Returns
    -------
    tensor of shape (R,) (or (R, B)), squared data units; differentiable through ``xhat``.
    """
    d = sq_dists_to_centroids(xhat, centroids)  # (R, B, K)
    per = d.min(dim=2).values  # (R, B), eq. 8 inner min
    return per if per_sample else per.mean(dim=1)


def historical_loss(losses, ids: Sequence[int] | None = None) -> float:
    """Historical loss (Def. 4.1): ``L_S = max_{C in S} l_C`` over the clusterings ``ids``.

    ``losses`` has shape (R,) (from :func:`clustering_losses`); ``ids=None`` takes all R.
    """
    losses = as_tensor(losses, name="losses", ndim=1, shape="(R,)")
    r = losses.shape[0]
    if ids is None:
        ids = list(range(r))
    ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    if not ids:
        raise InputError("The 'ids' argument must name at least one clustering; got an empty set.")
    bad = [i for i in ids if not 0 <= i < r]
    if bad:
        raise InputError(f"The 'ids' argument must hold clustering indices in [0, {r}); got {bad}.")
    return float(losses.detach()[ids].max())


# ----------------------------------------------------------------------------------------------
# KL, active units, mutual information, MSE

def _mu_logvar(mu, logvar):
    mu = as_tensor(mu, name="mu", ndim=2, shape="(m, n)")
    logvar = as_tensor(logvar, name="logvar", ndim=2, shape="(m, n)")
    _same_shape(mu, logvar, "mu", "logvar")
    _need_rows(mu, "mu", 1)
    return mu.detach().to(torch.float64), logvar.detach().to(device=mu.device, dtype=torch.float64)


def kl_per_dim(mu, logvar) -> torch.Tensor:
    """``mean_x KL(q(z|x) || N(0, I))`` per latent dimension, nats.

    ``mu``, ``logvar`` of shape (m, n) (encoder mean and log-variance); returns float64 (n,):
    ``0.5 * mean_x (mu_j^2 + exp(logvar_j) - 1 - logvar_j)``.
    """
    mu, logvar = _mu_logvar(mu, logvar)
    # expm1 keeps the tiny KL of a nearly collapsed dimension accurate (logvar ~ 0).
    return 0.5 * (mu * mu + torch.expm1(logvar) - logvar).mean(dim=0)


def kl_total(mu, logvar) -> float:
    """``mean_x KL(q(z|x) || N(0, I))`` summed over latent dimensions, nats."""
    return float(kl_per_dim(mu, logvar).sum())


@dataclass(frozen=True, eq=False)
class ActiveUnits:
    """Active latent units under one stated definition.

    ``active`` (bool, (n,)) and ``variance`` (float64, (n,)) live on CPU; ``variance`` is the
    per-dimension quantity compared with ``threshold``: ``Var_x(mu_j)`` for Burda's and the
    paper's 5.2 definition, the mean posterior variance ``E_x[s_j^2(x)]`` for the paper's 5.1.4.
    """

    count: int
    active: torch.Tensor
    variance: torch.Tensor
    threshold: float
    definition: str

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "active": self.active.tolist(), "variance": self.variance.tolist(),
                "threshold": self.threshold, "definition": self.definition}


def _mu_only(mu, rows: int) -> torch.Tensor:
    mu = as_tensor(mu, name="mu", ndim=2, shape="(m, n)")
    _need_rows(mu, "mu", rows)
    return mu.detach().to(torch.float64)


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not (math.isfinite(t) and t >= 0):
        raise InputError(f"The 'threshold' parameter must be a finite float >= 0. Got {threshold!r}.")
    return t


def active_units(mu, *, threshold: float = AU_THRESHOLD, unbiased: bool = True) -> ActiveUnits:
    """Active units of Burda et al. 2015, as He et al. 2019 ``calc_au``: ``Var_x(mu_j) >= threshold``.

    ``mu`` of shape (m, n); the variance over rows is unbiased (``ddof=1``, as ``calc_au``) unless
    ``unbiased=False``. This is the primary definition (claims.md "Collapse metrics").
    """
    t = _check_threshold(threshold)
    mu = _mu_only(mu, 2 if unbiased else 1)
    var = mu.var(dim=0, correction=1 if unbiased else 0).cpu()
    active = var >= t
    return ActiveUnits(int(active.sum()), active, var, t,
                       f"burda: Var_x(mu_j) >= {t:g} ({'unbiased' if unbiased else 'biased'})")


def active_units_posterior(logvar, *, threshold: float = 0.99) -> ActiveUnits:
    """The paper's 5.1.4 definition: dimension j active iff ``E_x[s_j^2(x)] < threshold``.

    ``logvar`` of shape (m, n), the encoder log-variance; ``statistic`` is ``E_x[exp(logvar_j)]``.
    """
    t = _check_threshold(threshold)
    logvar = as_tensor(logvar, name="logvar", ndim=2, shape="(m, n)")
    _need_rows(logvar, "logvar", 1)
    mean_var = logvar.detach().to(torch.float64).exp().mean(dim=0).cpu()
    active = mean_var < t
    return ActiveUnits(int(active.sum()), active, mean_var, t, f"paper 5.1.4: E_x[s_j^2] < {t:g}")


def active_units_paper_variance(mu, *, threshold: float = 0.005, unbiased: bool = True) -> ActiveUnits:
    """The paper's 5.2 / Table 3 definition: dimension j active iff ``Var_x(mu_j) > threshold``.

    The paper says neither which variance nor whether the bound is strict; we take the unbiased
    variance of ``mu`` (as Burda's) and the strict ``>`` of its text.
    """
    t = _check_threshold(threshold)
    mu = _mu_only(mu, 2 if unbiased else 1)
    var = mu.var(dim=0, correction=1 if unbiased else 0).cpu()
    active = var > t
    return ActiveUnits(int(active.sum()), active, var, t, f"paper 5.2/Table 3: Var_x(mu_j) > {t:g}")


def mutual_information(mu, logvar, *, n_samples: int = 1, seed: int = 0, chunk: int = 1024,
                       paired: bool = True) -> float:
    """Estimate ``I_q(x; z)`` in nats as He et al. 2019 ``calc_mi``.

    ``E_x E_q(z|x)[log q(z|x)] - E_x E_q(z|x)[log q(z)]`` with the aggregate posterior
    ``q(z) = mean_i N(z; mu_i, diag(exp(logvar_i)))`` over the m given rows, evaluated by
    log-sum-exp at ``n_samples`` draws ``z ~ q(z|x)`` per row. ``mu``, ``logvar`` of shape (m, n).
    ``paired=False`` is ``calc_mi`` exactly: the first term is the exact negative entropy, so an
    input-independent encoder still reads ``+-sqrt(n / (2 m n_samples))`` nats of pure Monte-Carlo
    noise. ``paired=True`` (default) evaluates both terms at the same draws, the same expectation
    with far less variance, and exactly 0 for an input-independent encoder (what a collapse
    check needs).
    The m x m log-densities are formed in float64 blocks of ``chunk`` draws, each block one matrix
    product (``sum_d w (z - mu)^2 = z^2.w - 2 z.(mu w) + mu^2.w`` with ``w = exp(-logvar)``), so
    m = 10k rows cost a few GEMMs, not an (m, m, n) tensor. The estimate is biased upward by at
    most ``log m`` (each draw's own component sits in the mixture), as ``calc_mi``'s is.
    """
    mu, logvar = _mu_logvar(mu, logvar)
    if int(n_samples) < 1:
        raise InputError(f"The 'n_samples' parameter must be an int >= 1. Got {n_samples!r}.")
    if int(chunk) < 1:
        raise InputError(f"The 'chunk' parameter must be an int >= 1. Got {chunk!r}.")
    m, n = mu.shape
    log2pi = math.log(2 * math.pi)
    # E_x E_q[log q(z|x)] = -0.5 n log(2 pi) - 0.5 mean_x sum_j (1 + logvar_j)
    neg_entropy = float((-0.5 * n * log2pi - 0.5 * (1 + logvar).sum(dim=1)).mean())
    gen = torch.Generator(device=mu.device).manual_seed(int(seed))
    std = torch.exp(0.5 * logvar)
    w = torch.exp(-logvar)  # (m, n) precisions
    mw = mu * w  # (m, n)
    const = (mu * mu * w).sum(dim=1) + logvar.sum(dim=1) + n * log2pi  # (m,)
    total, own = 0.0, 0.0
    for _ in range(int(n_samples)):
        eps = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=torch.float64)
        z = mu + std * eps  # (m, n), one draw per row
        # log q(z_i|x_i) at its own draw: -0.5 (|eps|^2 + sum logvar + n log 2 pi)
        own += float((-0.5 * ((eps * eps).sum(dim=1) + logvar.sum(dim=1) + n * log2pi)).sum())
        for start in range(0, m, int(chunk)):
            zc = z[start:start + int(chunk)]  # (c, n)
            quad = (zc * zc) @ w.t() - 2.0 * (zc @ mw.t())  # (c, m)
            log_density = -0.5 * (quad + const.unsqueeze(0))  # (c, m) log N(z_c; mu_i, var_i)
            log_qz = torch.logsumexp(log_density, dim=1) - math.log(m)  # (c,)
            total += float(log_qz.sum())
    first = own / (m * int(n_samples)) if paired else neg_entropy
    return first - total / (m * int(n_samples))


def recon_mse(x, xhat) -> float:
    """Reconstruction MSE ``mean_x ||x - xhat(x)||^2 / N`` (squared data units per coordinate)."""
    x = as_tensor(x, name="x", ndim=2, shape="(m, N)")
    xhat = as_tensor(xhat, name="xhat", ndim=2, shape="(m, N)")
    _same_shape(x, xhat, "x", "xhat")
    _need_rows(x, "x", 1)
    diff = x.detach().to(torch.float64) - xhat.detach().to(device=x.device, dtype=torch.float64)
    return float((diff * diff).mean())


# ----------------------------------------------------------------------------------------------
# all collapse metrics of one snapshot

@dataclass(frozen=True, eq=False)
class CollapseMetrics:
    """Collapse metrics of one snapshot on the evaluation data (claims.md "Collapse metrics").

    ``kl`` total nats; ``kl_per_dim`` float64 (n,) on CPU; ``au`` Burda's active units (primary);
    ``au_paper_posterior`` / ``au_paper_variance`` the paper's two variants; ``mi`` nats; ``mse``
    per coordinate; ``collapsed`` iff ``kl < COLLAPSE_KL`` (0.01 nats, :func:`hcdiag.claims.collapsed`).
    """

    kl: float
    kl_per_dim: torch.Tensor
    au: ActiveUnits
    au_paper_posterior: ActiveUnits
    au_paper_variance: ActiveUnits
    mi: float
    mse: float
    collapsed: bool
    n_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kl": self.kl, "kl_per_dim": self.kl_per_dim.tolist(), "au": self.au.to_dict(),
                "au_paper_posterior": self.au_paper_posterior.to_dict(),
                "au_paper_variance": self.au_paper_variance.to_dict(), "mi": self.mi, "mse": self.mse,
                "collapsed": self.collapsed, "n_rows": self.n_rows}


def collapse_metrics(x, mu, logvar, xhat, *, seed: int = 0) -> CollapseMetrics:
    """All collapse metrics of one snapshot.

    Parameters
    ----------
    x : (m, N) evaluation data; mu, logvar : (m, n) encoder outputs; xhat : (m, N) deterministic
    reconstructions ``f(mu(x))``; seed : seed of the MI estimate's draws.
    """
    per_dim = kl_per_dim(mu, logvar)
    kl = float(per_dim.sum())
    x_t = as_tensor(x, name="x", ndim=2, shape="(m, N)")
    mu_t = as_tensor(mu, name="mu", ndim=2, shape="(m, n)")
    if x_t.shape[0] != mu_t.shape[0]:
        raise InputError(f"The 'x' and 'mu' arguments must have the same number of rows; got {tuple(x_t.shape)} and "
                         f"{tuple(mu_t.shape)}.")
    return CollapseMetrics(
        kl=kl,
        kl_per_dim=per_dim.cpu(),
        au=active_units(mu),
        au_paper_posterior=active_units_posterior(logvar),
        au_paper_variance=active_units_paper_variance(mu),
        mi=mutual_information(mu, logvar, seed=seed),
        mse=recon_mse(x, xhat),
        collapsed=is_collapsed(kl),
        n_rows=int(mu_t.shape[0]),
    )
