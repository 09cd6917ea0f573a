"""The epsilon-prediction DDPM of section 7 (issue 14): an MLP denoiser with a sinusoidal time embedding, the
forward process, Tweedie's posterior mean and the two samplers (ancestral DDPM, deterministic DDIM).

The denoiser ``eps_hat(x_t, c)`` is conditioned on one of (``conditioning``):

* ``timestep``: the timestep t (1..T) of the one schedule it is trained on;
* ``schedule``: the timestep t and the schedule's index r among Algorithm 2's R schedules (each index its own
  learned embedding), so that the model may behave differently per schedule at the same noise level;
* ``logsnr``: the noise level only, ``log SNR(t)`` of whichever schedule drew it (Kingma et al. 2021; Karras et
  al. 2022): a schedule then only changes which noise levels are drawn.

Forward: ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``. Tweedie: ``E[x_0 | x_t] = (x_t - sqrt(1 - abar_t)
eps_hat) / sqrt(abar_t)``. Ancestral step (Ho et al. 2020, eq. 11, sigma_t^2 = the posterior variance
``beta_t (1 - abar_{t-1}) / (1 - abar_t)``); DDIM step (Song et al. 2021, eta = 0).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from hcdiag.diffusion.schedules import Schedule
from hcdiag.errors import InputError

CONDITIONINGS = ("timestep", "schedule", "logsnr")


def sinusoidal(v: torch.Tensor, dim: int, *, max_period: float = 10_000.0) -> torch.Tensor:
    """``(B,) -> (B, dim)``: ``[sin(v w_i), cos(v w_i)]`` with ``w_i = max_period^(-i / (dim/2))`` (Vaswani et al.
    2017; the DDPM's time embedding)."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=v.device) / half)
    a = v.float()[:, None] * w[None, :]
    out = torch.cat([torch.sin(a), torch.cos(a)], dim=1)
    return torch.nn.functional.pad(out, (0, dim - 2 * half))


class Denoiser(nn.Module):
    """``eps_hat = MLP([x_t, embedding])``, SiLU, ``widths`` hidden layers; the embedding of the conditioning
    (``conditioning``, module docstring), ``emb_dim`` wide. ``n_schedules``: R for ``schedule``."""

    def __init__(self, dim: int, *, widths=(128, 128, 128), emb_dim: int = 32, conditioning: str = "timestep",
                 n_schedules: int = 1):
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise InputError(f"The 'conditioning' parameter must be one of {', '.join(CONDITIONINGS)}. Got "
                             f"{conditioning!r}.")
        self.dim, self.emb_dim, self.conditioning = int(dim), int(emb_dim), conditioning
        self.n_schedules = int(n_schedules)
        self.schedule_emb = nn.Embedding(self.n_schedules, emb_dim) if conditioning == "schedule" else None
        layers, w_in = [], dim + emb_dim
        for w in widths:
            layers += [nn.Linear(w_in, w), nn.SiLU()]
            w_in = w
        layers.append(nn.Linear(w_in, dim))
        self.net = nn.Sequential(*layers)
        self.config = {"dim": self.dim, "widths": list(widths), "emb_dim": self.emb_dim, "conditioning": conditioning,
                       "n_schedules": self.n_schedules}

    def embed(self, t: torch.Tensor, log_snr: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        if self.conditioning == "logsnr":
            # log SNR spans about -10..10: scaled so the embedding's frequencies resolve it as they do t in 1..1000
            return sinusoidal(log_snr * 50.0, self.emb_dim)
        e = sinusoidal(t, self.emb_dim)
        if self.schedule_emb is not None:
            e = e + self.schedule_emb(r if r is not None else torch.zeros_like(t, dtype=torch.long))
        return e

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, log_snr: torch.Tensor, r: torch.Tensor | None = None):
        return self.net(torch.cat([x_t, self.embed(t, log_snr, r)], dim=1))


class Tables:
    """A schedule's ``abar``, ``beta``, ``log SNR`` as float64 tensors indexed by t = 0..T (t = 0: abar = 1,
    no noise; log SNR there is set to the t = 1 value, never used by a sampler)."""

    def __init__(self, schedule: Schedule, device="cpu"):
        b = schedule.betas()
        self.schedule, self.T = schedule, schedule.T
        self.beta = torch.as_tensor(np.concatenate([[0.0], b]), dtype=torch.float64, device=device)
        self.abar = torch.as_tensor(np.concatenate([[1.0], schedule.alphabar()]), dtype=torch.float64, device=device)
        ls = schedule.log_snr()
        self.log_snr = torch.as_tensor(np.concatenate([[ls[0]], ls]), dtype=torch.float64, device=device)


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, tab: Tables) -> torch.Tensor:
    """The forward process at the (B,) timesteps ``t``."""
    a = tab.abar[t].to(x0.dtype)[:, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, d), t (B,)) -> eps_hat (B, d)


def model_eps(model: Denoiser, tab: Tables, r: int = 0) -> EpsFn:
    """The trained denoiser as an ``eps(x_t, t)`` function under schedule ``tab`` (index ``r`` for
    ``schedule`` conditioning)."""
    def eps(x, t):
        rr = torch.full_like(t, int(r)) if model.conditioning == "schedule" else None
        return model(x.float(), t, tab.log_snr[t].float(), rr).to(x.dtype)
    return eps


def posterior_mean(eps: EpsFn, x_t: torch.Tensor, t: torch.Tensor, tab: Tables) -> torch.Tensor:
    """Tweedie: ``E[x_0 | x_t] = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)``."""
    a = tab.abar[t].to(x_t.dtype)[:, None]
    return (x_t - (1 - a).sqrt() * eps(x_t, t)) / a.sqrt()


@torch.no_grad()
def sample(eps: EpsFn, tab: Tables, n: int, dim: int, *, method: str = "ddpm", steps: int | None = None,
           generator: torch.Generator | None = None, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """``n`` samples from ``x_T ~ N(0, I)`` down to ``x_0``. ``ddpm``: every t = T..1, ancestral; ``ddim``: the
    ``steps`` (default T) timesteps evenly spaced from T down, deterministic (eta = 0)."""
    if method not in ("ddpm", "ddim"):
        raise InputError(f"The sampler must be ddpm or ddim. Got {method!r}.")
    x = torch.randn(n, dim, generator=generator, dtype=dtype, device=device)
    T = tab.T
    if method == "ddpm":
        for t in range(T, 0, -1):
            tt = torch.full((n,), t, dtype=torch.long, device=device)
            e = eps(x, tt)
            b, a, a_prev = tab.beta[t], tab.abar[t], tab.abar[t - 1]
            mean = (x - b / (1 - a).sqrt() * e) / (1 - b).sqrt()
            if t > 1:
                var = b * (1 - a_prev) / (1 - a)
                x = mean + var.sqrt() * torch.randn(n, dim, generator=generator, dtype=dtype, device=device)
            else:
                x = mean
        return x
    k = T if steps is None else int(steps)
    if not 1 <= k <= T:
        raise InputError(f"DDIM steps must lie in 1..T = {T}. Got {steps!r}.")
    ts = np.unique(np.round(np.linspace(T, 1, k)).astype(int))[::-1]
    for i, t in enumerate(ts):
        tt = torch.full((n,), int(t), dtype=torch.long, device=device)
        e = eps(x, tt)
        a = tab.abar[int(t)]
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        a_prev = tab.abar[int(ts[i + 1])] if i + 1 < len(ts) else tab.abar[0]
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return x


def gaussian_eps(mean: np.ndarray, cov: np.ndarray, tab: Tables) -> EpsFn:
    """The exact epsilon-predictor for data ``N(mean, cov)`` (an oracle: ``E[eps | x_t]``): with ``a = abar_t``,
    ``E[x_0|x_t] = m + sqrt(a) C (a C + (1-a) I)^-1 (x_t - sqrt(a) m)`` and ``eps = (x_t - sqrt(a) E[x_0|x_t]) /
    sqrt(1-a)``."""
    m = torch.as_tensor(mean, dtype=torch.float64)
    C = torch.as_tensor(cov, dtype=torch.float64)
    eye = torch.eye(C.shape[0], dtype=torch.float64)

    def eps(x, t):
        out = torch.empty_like(x)
        for tv in torch.unique(t):
            idx = t == tv
            a = tab.abar[int(tv)]
            gain = a.sqrt() * C @ torch.linalg.inv(a * C + (1 - a) * eye)
            x0 = m + (x[idx] - a.sqrt() * m) @ gain.T
            out[idx] = (x[idx] - a.sqrt() * x0) / (1 - a).sqrt()
        return out
    return eps


__all__ = ["CONDITIONINGS", "Denoiser", "Tables", "gaussian_eps", "model_eps", "posterior_mean", "q_sample", "sample",
           "sinusoidal"]
