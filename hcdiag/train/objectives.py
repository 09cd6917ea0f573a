"""The training objectives as pure functions on tensors (claims.md, Training pipeline; paper eq. 7).

Per sample, with ``f = f(z)``, ``z ~ q(z|x)``::

    recon weight * ||x - f||^2  +  kl_weight * KL(q(z|x) || N(0, I))  +  beta * cluster weight * min_k ||f - mu_k^C||^2

The weights come from the loss convention (:class:`hcdiag.losses.LossWeights`); the methods choose
``kl_weight`` (beta-VAE, annealing), ``free_bits`` (Kingma et al. 2016) and ``beta`` with the clusterings
(Historical Consensus). Nothing here draws random numbers or steps an optimizer: :mod:`hcdiag.train.loop`
does, in a fixed order, so runs are reproducible.
"""

from __future__ import annotations

import torch

from hcdiag.losses import LossWeights, gaussian_kl


def vae_terms(xb: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, f: torch.Tensor, weights: LossWeights,
              kl_weight: float = 1.0, free_bits: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(objective, recon, kl)`` of a batch, means over its B rows.

    Parameters
    ----------
    xb, f : (B, N) inputs and decoded samples; mu, logvar : (B, n) encoder outputs.
    weights : the convention's multipliers; ``recon = weights.recon * mean ||x - f||^2``.
    kl_weight : multiplies the KL term (1 for a VAE, beta for beta-VAE, the ramp for annealing).
    free_bits : Kingma et al. 2016: each dimension's batch-mean KL counts at least ``free_bits`` nats in the
        objective (``kl`` itself is reported unclamped).
    """
    recon = (xb - f).pow(2).sum(1).mean() * weights.recon
    kl_d = gaussian_kl(mu, logvar)  # (B, n)
    kl = kl_d.sum(1).mean()
    kl_obj = kl_d.mean(0).clamp(min=free_bits).sum() if free_bits > 0 else kl
    return recon + kl_weight * kl_obj, recon, kl


class ClusterTerm:
    """Sum over clusterings ``ids`` of eq. 8 on a batch: ``sum_r mean_x min_k ||f(x) - mu_rk||^2``.

    ONE matrix product against all their centroids (no loop over clusterings, no cdist); equals
    ``metrics.clustering_losses(f, centroids[ids]).sum()``. The product runs without autograd. Its gradient
    comes from the chosen centroids in closed form: almost everywhere d/df sum_r min_k ||f - mu_rk||^2 =
    2 (R f - sum_r mu_r*), which a surrogate with that gradient carries, so the backward pass is O(B N)
    instead of a second (B, R*K) x (R*K, N) product and a dense (B, R*K) scatter of the min's gradient.
    The flattened centroids of each set of ids are computed once and kept.
    """

    def __init__(self, centroids: torch.Tensor):
        self.centroids = centroids  # (R0, K, N)
        self._cache: dict[tuple, tuple] = {}

    def __call__(self, f: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        key = tuple(ids.tolist())
        cached = self._cache.get(key)
        if cached is None:
            c = self.centroids[ids]  # (R, K, N)
            flat = c.reshape(-1, c.shape[-1]).contiguous()  # (R*K, N)
            offsets = torch.arange(c.shape[0], device=c.device) * c.shape[1]  # (R,)
            cached = (flat, flat.T.contiguous(), flat.pow(2).sum(1), offsets, c.shape[0], c.shape[1])
            self._cache[key] = cached
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
