"""Training objectives: the paper's loss under each named convention, and the weight schedules.

Per sample, with ``f = f(z)``, ``z ~ q(z|x)`` (claims.md, Training pipeline)::

    ||x - f||^2 / (2 s2)  +  KL(q(z|x) || N(0, I))  +  beta * min_k ||f - mu_k^C||^2      (eq. 7)

The paper does not say how its terms are scaled and the outcome depends on it, so the convention is a
named, recorded option:

- ``literal``: exactly the line above.
- ``scaled``: the clustering term divided by ``2 s2``, on the footing of the reconstruction term.
- ``mean``: both squared errors averaged over the N dimensions (as ``mse_loss(reduction='mean')``);
  the KL term is unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from hcdiag.errors import InputError
from hcdiag.paper import LOSS_CONVENTIONS

Convention = Literal["literal", "scaled", "mean"]
CONVENTIONS = LOSS_CONVENTIONS


@dataclass(frozen=True)
class LossWeights:
    """Multipliers turning summed squared errors into the objective's terms for one convention."""

    recon: float  # multiplies ||x - f||^2
    cluster: float  # multiplies min_k ||f - mu_k||^2 (before beta)

    @classmethod
    def for_convention(cls, convention: str, s2: float, input_dim: int) -> "LossWeights":
        if convention not in CONVENTIONS:
            raise InputError(f"The loss convention must be one of {', '.join(CONVENTIONS)}. Got {convention!r}.")
        if not s2 > 0:
            raise InputError(f"The decoder variance s2 must be > 0. Got {s2}.")
        if convention == "literal":
            return cls(recon=1.0 / (2.0 * s2), cluster=1.0)
        if convention == "scaled":
            return cls(recon=1.0 / (2.0 * s2), cluster=1.0 / (2.0 * s2))
        return cls(recon=1.0 / (2.0 * s2 * input_dim), cluster=1.0 / input_dim)


@dataclass(frozen=True)
class Schedule:
    """A weight that ramps linearly from ``start`` to ``end`` over the first ``span`` units of progress.

    ``kind``: ``constant`` (always ``start``), ``linear`` (``start -> end``, the paper's beta 1 -> 4) or
    ``warmup`` (``0 -> end``, the warm-up from 0 that claims.md asks to run beside the paper's).
    """

    kind: Literal["constant", "linear", "warmup"] = "linear"
    start: float = 1.0
    end: float = 4.0

    def __post_init__(self):
        if self.kind not in ("constant", "linear", "warmup"):
            raise InputError(f"The schedule must be constant, linear or warmup. Got {self.kind!r}.")

    def value(self, progress: float) -> float:
        """Weight at ``progress`` in [0, 1] of the ramp (clamped)."""
        p = min(1.0, max(0.0, float(progress)))
        if self.kind == "constant":
            return float(self.start)
        lo = 0.0 if self.kind == "warmup" else float(self.start)
        return lo + (float(self.end) - lo) * p

    def to_dict(self) -> dict:
        return {"schedule": self.kind, **{k: v for k, v in asdict(self).items() if k != "kind"}}


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per sample and dimension, shape (B, n), nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps drawn from ``generator`` (reproducible, resumable)."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps
