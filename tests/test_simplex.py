"""The simplex witness kernels (hcdiag.simplex): the vertices, the closed-form inverse and its energy, against
their definitions computed independently (issue 13's W1 and W2)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hcdiag.checks.witness import alignment_loss, teacher_information
from hcdiag.errors import InputError
from hcdiag.simplex import code_energy, inverse_code, simplex_vertices, witness


def _dirichlet(g, m, K, alpha):
    """Random teacher rows (m, K), peaked for small ``alpha``: normalised powers of Exp(1) draws (alpha = 1 is a
    uniform Dirichlet; torch's Dirichlet takes no generator)."""
    x = (-torch.log(torch.rand(m, K, generator=g, dtype=torch.float64))) ** (1 / alpha)
    return (x + 1e-9) / (x + 1e-9).sum(1, keepdim=True)


@pytest.mark.parametrize("K,n", [(2, 1), (3, 2), (5, 4), (8, 7), (8, 48), (16, 16)])
def test_vertices_form_a_centred_regular_simplex_of_unit_vectors(K, n):
    V = simplex_vertices(K, n)
    assert V.shape == (K, n) and V.dtype == torch.float64
    assert torch.allclose(V.sum(0), torch.zeros(n, dtype=torch.float64), atol=1e-12)
    for j, k in itertools.product(range(K), repeat=2):  # naive loop over every pair
        want = 1.0 if j == k else -1.0 / (K - 1)
        assert abs(float(V[j] @ V[k]) - want) < 1e-12, (j, k)


def test_vertices_need_a_latent_dimension_of_at_least_k_minus_1():
    with pytest.raises(InputError, match=r"^A regular simplex of K = 8 unit vectors needs a latent dimension >= "
                                         r"K - 1 = 7; got 6: use a latent dimension of at least 7 or a teacher "
                                         r"with at most 7 components\.$"):
        simplex_vertices(8, 6)
    with pytest.raises(InputError, match=r"needs K >= 2"):
        simplex_vertices(1, 4)


@pytest.mark.parametrize("K", [2, 3, 8])
def test_w1_the_best_constant_student_pays_exactly_the_teacher_information(seed, K):
    T = _dirichlet(torch.Generator().manual_seed(seed), 200, K, 0.5)
    tbar = T.mean(0, keepdim=True).expand_as(T)
    naive_info = float(-(T.mean(0) * T.mean(0).log()).sum() + (T * T.log()).sum(1).mean())  # H(mean T) - mean H(T)
    assert abs(alignment_loss(T, tbar) - teacher_information(T)) < 1e-10
    assert abs(teacher_information(T) - naive_info) < 1e-10
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(5):  # any other constant student pays I_T + KL(mean T || q) > I_T
        q = _dirichlet(g, 1, K, 1.0).expand_as(T)
        kl = float((T.mean(0) * (T.mean(0) / q[0]).log()).sum())
        assert abs(alignment_loss(T, q) - (teacher_information(T) + kl)) < 1e-10 and kl > 0


@pytest.mark.parametrize("K,n,beta_w", [(2, 1, 1.0), (4, 3, 0.5), (8, 48, 3.0), (10, 12, 7.5)])
def test_w2_the_inverse_code_reproduces_the_teacher_and_costs_its_energy(seed, K, n, beta_w):
    T = _dirichlet(torch.Generator().manual_seed(seed), 100, K, 0.8)
    V = simplex_vertices(K, n)
    z = inverse_code(T, V, beta_w=beta_w)
    assert torch.allclose(witness(z, V, beta_w=beta_w), T, rtol=0, atol=1e-6)
    # energy: 1/2 ||z||^2 against the formula, with the centred log-odds computed by a naive loop
    l = torch.stack([torch.tensor([math.log(t[k]) - sum(math.log(u) for u in t) / K for k in range(K)],
                                  dtype=torch.float64) for t in T.tolist()])
    want = (K - 1) / (2 * K * beta_w ** 2) * (l ** 2).sum(1)
    assert torch.allclose(0.5 * (z ** 2).sum(1), want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(code_energy(T, beta_w=beta_w), want, rtol=1e-10, atol=1e-12)
    # the KL of a Gaussian encoder with that mean and any variance is at least the energy
    g = torch.Generator().manual_seed(seed + 2)
    logvar = torch.randn(z.shape, generator=g, dtype=torch.float64)
    kl = 0.5 * (z ** 2 + logvar.exp() - 1 - logvar).sum(1)
    assert torch.all(kl >= want - 1e-12)


def test_a_constant_mean_cannot_beat_the_best_constant_student(seed):
    """The certificate's direction: a witness of a constant mu is a constant student, so it pays >= I_T."""
    K = 5
    T = _dirichlet(torch.Generator().manual_seed(seed), 300, K, 0.6)
    V = simplex_vertices(K, 6)
    mu = torch.randn(1, 6, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64).expand(300, 6)
    assert alignment_loss(T, witness(mu, V, beta_w=2.0)) >= teacher_information(T) - 1e-12


def test_zeros_in_the_teacher_are_floored_and_bad_inputs_refused():
    V = simplex_vertices(3, 2)
    T = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    W = witness(inverse_code(T, V, beta_w=1.0), V, beta_w=1.0)
    assert torch.allclose(W, T, atol=1e-11)
    with pytest.raises(InputError, match=r"beta_w .* must be a finite float > 0; got 0"):
        inverse_code(T, V, beta_w=0)
    with pytest.raises(InputError, match=r"The teacher must be \(m, K\) with K = 3"):
        inverse_code(T[:, :2], V, beta_w=1.0)
    with pytest.raises(InputError, match=r"mu must be \(m, n\) with n = 2"):
        witness(torch.zeros(4, 3), V, beta_w=1.0)
