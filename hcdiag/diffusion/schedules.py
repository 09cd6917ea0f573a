"""Noise schedules of section 7's diffusion models (issue 14), their conventions stated and printed.

A schedule is ``T`` values ``beta_1..beta_T`` (float64); ``alphabar_t = prod_{s<=t} (1 - beta_s)``, the forward
process ``x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps`` and the signal-to-noise ratio
``SNR(t) = alphabar_t / (1 - alphabar_t)``. Timesteps are 1-based here (``t = 1..T``; array index ``t - 1``),
as in Ho et al. (2020). The kinds follow the definitions of diffusers' ``DDPMScheduler`` (``beta_schedule``):

* ``linear``: ``T`` values evenly spaced from ``beta_start`` to ``beta_end`` (DDPM: 1e-4, 0.02, T = 1000);
* ``scaled_linear``: evenly spaced in ``sqrt(beta)`` from ``sqrt(beta_start)`` to ``sqrt(beta_end)``, squared
  (Stable Diffusion's: 0.00085, 0.012);
* ``cosine`` (diffusers ``squaredcos_cap_v2``; Nichol & Dhariwal 2021): ``beta_t = min(1 - f(t/T) / f((t-1)/T),
  max_beta)`` with ``f(u) = cos^2(((u + s) / (1 + s)) pi / 2)``, ``s = 0.008``, ``max_beta = 0.999``;
* ``sigmoid``: ``beta_start + (beta_end - beta_start) sigmoid(linspace(-6, 6, T))`` (diffusers' ``sigmoid``).

diffusers computes ``linear`` and ``scaled_linear`` in float32; hcdiag in float64 (the same formula).

>>> s = Schedule("linear")
>>> s.spec, s.T, round(float(s.betas()[0]), 6), round(float(s.betas()[-1]), 6)
('linear(beta 0.0001..0.02, T=1000)', 1000, 0.0001, 0.02)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hcdiag.errors import InputError

KINDS = ("linear", "scaled_linear", "cosine", "sigmoid")
DEFAULTS = {"linear": dict(beta_start=1e-4, beta_end=0.02), "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
            "cosine": dict(s=0.008, max_beta=0.999), "sigmoid": dict(beta_start=1e-4, beta_end=0.02)}
MAX_T = 100_000


@dataclass(frozen=True)
class Schedule:
    """One noise schedule: its ``kind`` (:data:`KINDS`), ``T`` and the kind's parameters (``beta_start`` and
    ``beta_end`` for the beta-range kinds; ``s`` and ``max_beta`` for ``cosine``); absent ones take
    :data:`DEFAULTS`."""

    kind: str
    T: int = 1000
    beta_start: float | None = None
    beta_end: float | None = None
    s: float | None = None
    max_beta: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"Unknown noise schedule {self.kind!r}; choose among {', '.join(KINDS)}.")
        if not isinstance(self.T, int) or isinstance(self.T, bool) or not 2 <= self.T <= MAX_T:
            raise InputError(f"A schedule's T must be an integer in 2..{MAX_T}. Got {self.T!r}.")
        for k, v in DEFAULTS[self.kind].items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)
        if self.kind == "cosine":
            if not (0 <= self.s < 1 and 0 < self.max_beta < 1):
                raise InputError(f"The cosine schedule needs 0 <= s < 1 and 0 < max_beta < 1. Got s = {self.s!r}, "
                                 f"max_beta = {self.max_beta!r}.")
        elif not (0 < self.beta_start < 1 and 0 < self.beta_end < 1 and self.beta_start <= self.beta_end):
            raise InputError(f"The {self.kind} schedule needs 0 < beta_start <= beta_end < 1. Got {self.beta_start!r}.."
                             f"{self.beta_end!r}.")

    @property
    def spec(self) -> str:
        if self.kind == "cosine":
            return f"cosine(s {self.s:g}, max_beta {self.max_beta:g}, T={self.T})"
        return f"{self.kind}(beta {self.beta_start:g}..{self.beta_end:g}, T={self.T})"

    def betas(self) -> np.ndarray:
        """``beta_t`` for ``t = 1..T``, shape (T,), float64."""
        T = self.T
        if self.kind == "linear":
            return np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        if self.kind == "scaled_linear":
            return np.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), T, dtype=np.float64) ** 2
        if self.kind == "sigmoid":
            return self.beta_start + (self.beta_end - self.beta_start) / (1 + np.exp(-np.linspace(-6, 6, T)))
        u = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((u + self.s) / (1 + self.s) * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], self.max_beta)

    def alphabar(self) -> np.ndarray:
        """``alphabar_t`` for ``t = 1..T``, decreasing, float64 (a cumulative product of ``1 - beta``)."""
        return np.cumprod(1.0 - self.betas())

    def snr(self) -> np.ndarray:
        a = self.alphabar()
        return a / (1.0 - a)

    def log_snr(self) -> np.ndarray:
        a = self.alphabar()
        return np.log(a) - np.log1p(-a)

    @property
    def terminal_snr(self) -> float:
        return float(self.snr()[-1])

    def describe(self) -> str:
        """One line: the schedule, its alphabar range and its terminal SNR (what the model never sees: a terminal
        SNR above 0 means x_T still carries signal, Lin et al. 2024)."""
        a = self.alphabar()
        return (f"{self.spec}: alphabar {a[0]:.6g} at t=1 .. {a[-1]:.3g} at t={self.T}, terminal SNR "
                f"{self.terminal_snr:.3g} (log-SNR {self.log_snr()[-1]:.3g})")


def parse_schedule(text: str, T: int = 1000) -> Schedule:
    """``kind`` or ``kind:a,b`` (``a, b`` = ``beta_start, beta_end``; for ``cosine``: ``s`` or ``s, max_beta``)."""
    kind, _, args = str(text).strip().partition(":")
    try:
        vals = [float(v) for v in args.split(",")] if args else []
    except ValueError:
        raise InputError(f"Schedule {text!r}: the values after the colon must be numbers (e.g. linear:1e-4,0.02 or "
                         "cosine:0.008).") from None
    keys = ("s", "max_beta") if kind == "cosine" else ("beta_start", "beta_end")
    if len(vals) > 2:
        raise InputError(f"Schedule {text!r}: at most two values ({', '.join(keys)}).")
    return Schedule(kind, T, **dict(zip(keys, vals)))


def family(kind: str, R: int, *, T: int = 1000, spread: float = 2.0) -> list[Schedule]:
    """``R`` schedules of one kind for Algorithm 2, differing in range (or, for ``cosine``, offset ``s``): the
    kind's end value (``beta_end``; ``s``) spaced geometrically over ``[default / spread, default * spread]``, the
    start value kept. ``R = 1`` gives the default schedule."""
    if kind not in KINDS:
        raise InputError(f"Unknown noise schedule {kind!r}; choose among {', '.join(KINDS)}.")
    if not isinstance(R, int) or R < 1:
        raise InputError(f"A schedule family needs R >= 1 schedules. Got {R!r}.")
    if not spread >= 1:
        raise InputError(f"The family's spread must be >= 1. Got {spread!r}.")
    d = DEFAULTS[kind]
    key = "s" if kind == "cosine" else "beta_end"
    vals = [d[key]] if R == 1 else list(np.geomspace(d[key] / spread, d[key] * spread, R))
    if kind != "cosine":
        vals = [min(max(v, d["beta_start"]), 0.999) for v in vals]
    return [Schedule(kind, T, **{key: float(v)}) for v in vals]


__all__ = ["DEFAULTS", "KINDS", "Schedule", "family", "parse_schedule"]
