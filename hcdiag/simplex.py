"""The simplex witness of the companion notes (seed 000): a fixed head on the latent mean, its closed-form
inverse and the energy that inverse costs (issue 13; checks W1 and W2 are built on these kernels).

* Vertices: ``K`` unit vectors ``v_1..v_K`` in the latent space R^n forming a centred regular simplex:
  ``sum_k v_k = 0`` and ``<v_j, v_k> = -1/(K-1)`` for ``j != k``. They exist only when ``n >= K - 1`` (K points
  with those inner products span a (K-1)-dimensional space); hcdiag refuses ``n < K - 1`` with one line.
* The witness ``W(k|x) = softmax_k(beta_w <v_k, mu(x)>)`` reads only the latent mean; nothing of it is trained.
* The closed-form inverse: with the centred log-odds ``l_k = log T(k|x) - mean_j log T(j|x)``, the code
  ``z = ((K-1) / (K beta_w)) sum_k l_k v_k`` gives ``softmax_k(beta_w <v_k, z>) = T(k|x)`` exactly, since
  ``<v_j, z> = ((K-1)/(K beta_w)) (l_j + l_j/(K-1)) = l_j / beta_w`` (the l_k sum to 0).
* Its energy ``1/2 ||z||^2 = (K-1) / (2 K beta_w^2) ||l||^2``, since ``||sum_k l_k v_k||^2 = ||l||^2 K/(K-1)``.
  An encoder whose mean is ``z`` has ``KL(N(z, diag s^2) || N(0, I)) = 1/2 ||z||^2 + 1/2 sum_j (s_j^2 - 1 -
  log s_j^2) >= 1/2 ||z||^2``: the energy is a lower bound on the KL this code carries.

A teacher row with a zero has an infinite log-odds: :func:`inverse_code` floors the teacher at ``floor``
(default 1e-12) and renormalises, and reproduces that floored teacher. All in float64.

>>> import torch
>>> V = simplex_vertices(3, 2)
>>> T = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
>>> z = inverse_code(T, V, beta_w=2.0)
>>> torch.allclose(witness(z, V, beta_w=2.0), T, atol=1e-12)
True
"""

from __future__ import annotations

import math

import torch

from hcdiag.errors import InputError

__all__ = ["code_energy", "inverse_code", "simplex_vertices", "witness"]


def simplex_vertices(K: int, n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(K, n): the vertices of a centred regular simplex of unit vectors in R^n (the first K-1 coordinates;
    the rest 0). Refuses ``n < K - 1`` (no such simplex exists) and ``K < 2``."""
    if not isinstance(K, int) or isinstance(K, bool) or K < 2:
        raise InputError(f"The simplex witness needs K >= 2 classes (a teacher with K components); got K = {K!r}.")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"The latent dimension must be an integer >= 1; got {n!r}.")
    if n < K - 1:
        raise InputError(f"A regular simplex of K = {K} unit vectors needs a latent dimension >= K - 1 = {K - 1}; "
                         f"got {n}: use a latent dimension of at least {K - 1} or a teacher with at most {n + 1} "
                         "components.")
    E = torch.eye(K, dtype=torch.float64) - 1.0 / K  # rows: e_k - centroid, in the (K-1)-dim plane sum = 0
    # an orthonormal basis of that plane: the first K-1 left singular vectors of the centred identity
    U, S, _ = torch.linalg.svd(E)
    B = U[:, : K - 1]  # (K, K-1), B^T B = I
    coords = E @ B  # (K, K-1): each vertex in the plane's coordinates
    coords = coords / coords.norm(dim=1, keepdim=True)
    out = torch.zeros(K, n, dtype=torch.float64)
    out[:, : K - 1] = coords
    return out.to(dtype)


def _check(V: torch.Tensor, beta_w: float) -> None:
    if not (isinstance(beta_w, (int, float)) and math.isfinite(beta_w) and beta_w > 0):
        raise InputError(f"beta_w (the witness's inverse temperature) must be a finite float > 0; got {beta_w!r}.")
    if V.ndim != 2:
        raise InputError(f"The vertices must be a (K, n) matrix; got shape {tuple(V.shape)}.")


def witness(mu: torch.Tensor, V: torch.Tensor, *, beta_w: float) -> torch.Tensor:
    """(m, K): ``W(k|x) = softmax_k(beta_w <v_k, mu(x)>)`` for latent means ``mu`` (m, n), in float64."""
    _check(V, beta_w)
    if mu.ndim != 2 or mu.shape[1] != V.shape[1]:
        raise InputError(f"mu must be (m, n) with n = {V.shape[1]} (the vertices' dimension); got {tuple(mu.shape)}.")
    return torch.softmax(beta_w * (mu.double() @ V.double().T), dim=1)


def _log_odds(T: torch.Tensor, floor: float) -> torch.Tensor:
    T = T.double().clamp_min(floor)
    T = T / T.sum(1, keepdim=True)
    logT = T.log()
    return logT - logT.mean(1, keepdim=True)  # (m, K), each row sums to 0


def inverse_code(T: torch.Tensor, V: torch.Tensor, *, beta_w: float, floor: float = 1e-12) -> torch.Tensor:
    """(m, n): the code ``z = ((K-1) / (K beta_w)) sum_k l_k v_k`` whose witness is the teacher ``T`` (m, K)
    (floored at ``floor`` and renormalised)."""
    _check(V, beta_w)
    K = V.shape[0]
    if T.ndim != 2 or T.shape[1] != K:
        raise InputError(f"The teacher must be (m, K) with K = {K} (the vertices); got {tuple(T.shape)}.")
    return (K - 1) / (K * beta_w) * (_log_odds(T, floor) @ V.double())


def code_energy(T: torch.Tensor, *, beta_w: float, floor: float = 1e-12) -> torch.Tensor:
    """(m,): ``1/2 ||z||^2 = (K-1) / (2 K beta_w^2) ||l||^2`` of :func:`inverse_code`'s code, in nats: a lower
    bound on the KL an encoder whose mean is that code carries."""
    if not (isinstance(beta_w, (int, float)) and math.isfinite(beta_w) and beta_w > 0):
        raise InputError(f"beta_w (the witness's inverse temperature) must be a finite float > 0; got {beta_w!r}.")
    K = T.shape[1]
    return (K - 1) / (2 * K * beta_w ** 2) * (_log_odds(T, floor) ** 2).sum(1)
