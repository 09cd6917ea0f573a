"""Collapse metrics and clustering losses against naive loops, scipy, and closed forms."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import logsumexp
from scipy.stats import norm

from hcdiag.errors import InputError
from hcdiag.metrics import (
    active_units,
    active_units_paper_variance,
    active_units_posterior,
    clustering_losses,
    collapse_metrics,
    historical_loss,
    kl_per_dim,
    kl_total,
    mutual_information,
    recon_mse,
    sq_dists_to_centroids,
)


def _naive_losses(xhat, cents):
    """Triple loop of eq. 8: per clustering, per sample, the nearest centroid."""
    R, K, N = cents.shape
    out = np.zeros((R, xhat.shape[0]))
    for r in range(R):
        for b in range(xhat.shape[0]):
            out[r, b] = min(sum((xhat[b, i] - cents[r, k, i]) ** 2 for i in range(N)) for k in range(K))
    return out


# ---------------------------------------------------------------------------------- losses

def test_clustering_losses_match_naive_triple_loop(seed):
    rng = np.random.default_rng(seed)
    xhat = rng.normal(size=(13, 5))
    cents = rng.normal(size=(4, 3, 5))
    naive = _naive_losses(xhat, cents)
    per = clustering_losses(torch.from_numpy(xhat), torch.from_numpy(cents), per_sample=True)
    assert per.shape == (4, 13)
    np.testing.assert_allclose(per.numpy(), naive, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(clustering_losses(xhat, cents).numpy(), naive.mean(axis=1), rtol=1e-10)


def test_sq_dists_match_cdist(seed):
    rng = np.random.default_rng(seed)
    xhat = torch.from_numpy(rng.normal(size=(64, 196)))
    cents = torch.from_numpy(rng.normal(size=(16, 8, 196)))
    d = sq_dists_to_centroids(xhat, cents)  # (R, B, K)
    ref = torch.stack([torch.cdist(xhat, cents[r], compute_mode="donot_use_mm_for_euclid_dist") ** 2
                       for r in range(16)])
    assert d.shape == (16, 64, 8)
    np.testing.assert_allclose(d.numpy(), ref.numpy(), rtol=1e-9, atol=1e-9)


def test_sq_dists_float32_and_mixed_dtypes(seed):
    rng = np.random.default_rng(seed)
    xhat = rng.uniform(size=(32, 196)).astype(np.float32)
    cents = rng.uniform(size=(3, 8, 196))
    got = sq_dists_to_centroids(torch.from_numpy(xhat), torch.from_numpy(cents))
    assert got.dtype == torch.float64  # promoted
    got32 = sq_dists_to_centroids(torch.from_numpy(xhat), torch.from_numpy(cents.astype(np.float32)))
    ref = ((xhat.astype(np.float64)[None, :, None, :] - cents[:, None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10)
    # float32 expansion ||x||^2 + ||c||^2 - 2 x.c, each ~ 65 here: a float32 sum of 196 products errs by up to
    # about n u sum|terms| (Higham), ~3e-3; typically ~1e-5, and 1e-4 was exceeded once (1.01e-4, CI, one seed of
    # many); a wrong centroid or term would be off by O(1)
    np.testing.assert_allclose(got32.numpy(), ref, rtol=0, atol=1e-3)


def test_gradients_flow_and_match_closed_form(seed):
    rng = np.random.default_rng(seed)
    xhat = torch.from_numpy(rng.normal(size=(9, 4))).requires_grad_(True)
    cents = torch.from_numpy(rng.normal(size=(3, 5, 4)))
    losses = clustering_losses(xhat, cents)
    losses.sum().backward()
    # d/dxhat_b sum_C l_C = sum_C 2 (xhat_b - mu_{k*(b,C)}^C) / B
    x = xhat.detach().numpy()
    c = cents.numpy()
    expected = np.zeros_like(x)
    for r in range(3):
        for b in range(9):
            k = np.argmin(((x[b] - c[r]) ** 2).sum(1))
            expected[b] += 2 * (x[b] - c[r, k]) / 9
    np.testing.assert_allclose(xhat.grad.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: clustering_losses(z, cents), (xhat.detach().clone().requires_grad_(),))


def test_historical_loss_is_max_over_subset(seed):
    rng = np.random.default_rng(seed)
    losses = rng.uniform(size=10)
    ids = sorted(rng.choice(10, size=4, replace=False).tolist())
    assert historical_loss(losses, ids) == max(losses[i] for i in ids)
    assert historical_loss(torch.from_numpy(losses)) == losses.max()
    with pytest.raises(InputError, match=r"The 'ids' argument must name at least one clustering; got an empty set"):
        historical_loss(losses, [])
    with pytest.raises(InputError, match=r"The 'ids' argument must hold clustering indices in \[0, 10\); got \[10, -1\]"):
        historical_loss(losses, [1, 10, -1])


def test_loss_input_errors():
    with pytest.raises(InputError, match=r"The 'xhat' argument must be a 2-D array of shape \(B, N\); got shape \(3,\)"):
        clustering_losses(np.zeros(3), np.zeros((1, 2, 3)))
    with pytest.raises(InputError, match=r"The 'centroids' argument must be a 3-D array of shape \(R, K, N\); got shape \(2, 3\)"):
        clustering_losses(np.zeros((4, 3)), np.zeros((2, 3)))
    with pytest.raises(InputError, match=r"The 'xhat' rows and the 'centroids' must have the same length N; got xhat \(4, 3\) and centroids \(1, 2, 5\)"):
        clustering_losses(np.zeros((4, 3)), np.zeros((1, 2, 5)))
    with pytest.raises(InputError, match=r"The 'xhat' argument must be a numeric array of shape \(B, N\); it could not be read"):
        clustering_losses([["a", "b"]], np.zeros((1, 2, 2)))


# ---------------------------------------------------------------------------------- KL

def test_kl_per_dim_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    m, n = 37, 6
    mu = rng.normal(size=(m, n)) * rng.uniform(0, 3, size=n)
    logvar = rng.normal(size=(m, n))
    naive = np.zeros(n)
    for i in range(m):
        for j in range(n):
            naive[j] += 0.5 * (mu[i, j] ** 2 + math.exp(logvar[i, j]) - 1 - logvar[i, j]) / m
    got = kl_per_dim(torch.from_numpy(mu).float(), torch.from_numpy(logvar).float())
    assert got.dtype == torch.float64 and got.shape == (n,)
    np.testing.assert_allclose(got.numpy(), naive, rtol=1e-6)  # inputs rounded to float32
    np.testing.assert_allclose(kl_total(mu, logvar), naive.sum(), rtol=1e-12)


def test_kl_zero_exactly_at_prior():
    assert kl_total(np.zeros((5, 3)), np.zeros((5, 3))) == 0.0


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (7, 3), elements=st.floats(-20, 20)), arrays(np.float64, (7, 3), elements=st.floats(-20, 20)))
def test_kl_nonnegative(mu, logvar):
    assert (kl_per_dim(mu, logvar).numpy() >= 0).all()


# ---------------------------------------------------------------------------------- active units

@pytest.mark.parametrize("unbiased", [True, False])
def test_active_units_match_naive_var(seed, unbiased):
    rng = np.random.default_rng(seed)
    m, n = 50, 12
    mu = rng.normal(size=(m, n)) * np.geomspace(1e-3, 1, n)
    au = active_units(torch.from_numpy(mu), unbiased=unbiased)
    ddof = 1 if unbiased else 0
    naive_var = [float(np.var(mu[:, j], ddof=ddof)) for j in range(n)]
    np.testing.assert_allclose(au.variance.numpy(), naive_var, rtol=1e-12)
    assert au.active.tolist() == [v >= 0.01 for v in naive_var]
    assert au.count == sum(v >= 0.01 for v in naive_var)
    assert au.to_dict()["count"] == au.count


def test_threshold_boundaries_burda_vs_paper():
    mu = np.array([[0.0, 0.0], [1.0, 0.0]])  # unbiased variances 0.5 and 0
    assert active_units(mu, threshold=0.5).count == 1  # calc_au: >=
    assert active_units_paper_variance(mu, threshold=0.5).count == 0  # paper text: strictly >
    assert active_units_paper_variance(mu, threshold=0.4999).count == 1
    assert active_units(mu, threshold=0.5, unbiased=False).count == 0  # biased variance 0.25


def test_paper_variants_match_naive(seed):
    rng = np.random.default_rng(seed)
    m, n = 40, 9
    logvar = rng.uniform(-3, 0.5, size=(m, n))
    mu = rng.normal(size=(m, n)) * rng.uniform(0, 0.2, size=n)
    post = active_units_posterior(logvar)
    mean_var = [float(np.mean(np.exp(logvar[:, j]))) for j in range(n)]
    np.testing.assert_allclose(post.variance.numpy(), mean_var, rtol=1e-12)
    assert post.active.tolist() == [v < 0.99 for v in mean_var]
    pv = active_units_paper_variance(mu)
    assert pv.active.tolist() == [float(np.var(mu[:, j], ddof=1)) > 0.005 for j in range(n)]
    assert "5.1.4" in post.definition and "5.2" in pv.definition


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(2, 9), st.integers(1, 6)), elements=st.floats(-1e3, 1e3)))
def test_active_units_at_most_latent_dim(mu):
    n = mu.shape[1]
    assert 0 <= active_units(mu).count <= n
    assert 0 <= active_units_paper_variance(mu).count <= n
    assert 0 <= active_units_posterior(mu / 100).count <= n


def test_active_unit_errors():
    with pytest.raises(InputError, match=r"The 'threshold' parameter must be a finite float >= 0. Got -1"):
        active_units(np.zeros((3, 2)), threshold=-1)
    with pytest.raises(InputError, match=r"The 'mu' argument has 1 row\(s\); at least 2 are needed"):
        active_units(np.zeros((1, 2)))
    with pytest.raises(InputError, match=r"The 'logvar' argument must be a 2-D array of shape \(m, n\); got shape \(4,\)"):
        active_units_posterior(np.zeros(4))


# ---------------------------------------------------------------------------------- mutual information

def test_mi_gaussian_closed_form(seed):
    # q(z|x) = N(a x, s^2) per dim with x ~ N(0, 1): q(z) = N(0, a^2 + s^2), so
    # I(x; z) = sum_j 0.5 log((a_j^2 + s_j^2) / s_j^2) nats.
    rng = np.random.default_rng(seed)
    a = np.array([1.0, 0.5, 0.0])
    s = np.array([0.5, 0.8, 1.0])
    truth = 0.5 * np.log((a**2 + s**2) / s**2).sum()  # 0.9696
    x = rng.normal(size=(4000, 3))
    mu = a * x
    logvar = np.tile(2 * np.log(s), (4000, 1))
    est = mutual_information(mu, logvar, n_samples=4, seed=seed)
    # Monte Carlo: over 30 seeds at m = 4000, n_samples = 1 the error had mean 0.004 and sd 0.016
    # (aggregate posterior estimated from the m rows); 0.08 is about 5 sd for n_samples = 1.
    assert abs(est - truth) < 0.08


def test_mi_matches_naive_computation_with_same_draws(seed):
    rng = np.random.default_rng(seed)
    m, n = 30, 3
    mu = rng.normal(size=(m, n))
    logvar = rng.uniform(-2, 1, size=(m, n))
    # the same draws the estimator makes (float64 normals from a seeded generator, one per row)
    eps = torch.randn((m, n), generator=torch.Generator().manual_seed(seed % 1000), dtype=torch.float64).numpy()
    z = mu + np.exp(0.5 * logvar) * eps
    sd = np.exp(0.5 * logvar)
    log_qz = np.array([logsumexp([norm.logpdf(z[i], mu[k], sd[k]).sum() for k in range(m)]) - np.log(m)
                       for i in range(m)])
    log_qzx = np.array([norm.logpdf(z[i], mu[i], sd[i]).sum() for i in range(m)])
    # calc_mi (paired=False) uses the exact negative entropy for the first term
    neg_entropy = np.mean(-0.5 * n * np.log(2 * np.pi) - 0.5 * (1 + logvar).sum(1))
    for chunk in (1, 7, 1024):
        got = mutual_information(mu, logvar, seed=seed % 1000, chunk=chunk, paired=False)
        assert got == pytest.approx(neg_entropy - log_qz.mean(), rel=1e-9, abs=1e-9)
        got = mutual_information(mu, logvar, seed=seed % 1000, chunk=chunk)
        assert got == pytest.approx(np.mean(log_qzx - log_qz), rel=1e-9, abs=1e-9)


def test_mi_zero_for_input_independent_encoder(seed):
    rng = np.random.default_rng(seed)
    row_mu = rng.normal(size=4)
    row_lv = rng.normal(size=4)
    mu = np.tile(row_mu, (500, 1))
    logvar = np.tile(row_lv, (500, 1))
    # every component equals q(z): log q(z|x) - log q(z) is 0 up to rounding for every draw
    assert abs(mutual_information(mu, logvar, seed=seed)) < 1e-9
    # calc_mi's exact-entropy form only in expectation: the mean of 500 draws of a chi-square(4)/2
    # term, sd sqrt(4/2/500) = 0.063; 0.4 is over 6 sd
    assert abs(mutual_information(mu, logvar, seed=seed, paired=False)) < 0.4


def test_mi_errors():
    with pytest.raises(InputError, match=r"The 'mu' and 'logvar' arguments must have the same shape; got \(3, 2\) and \(3, 1\)"):
        mutual_information(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(InputError, match=r"The 'n_samples' parameter must be an int >= 1. Got 0"):
        mutual_information(np.zeros((3, 2)), np.zeros((3, 2)), n_samples=0)
    with pytest.raises(InputError, match=r"The 'chunk' parameter must be an int >= 1. Got 0"):
        mutual_information(np.zeros((3, 2)), np.zeros((3, 2)), chunk=0)


# ---------------------------------------------------------------------------------- MSE and the bundle

def test_recon_mse_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20, 7))
    xhat = rng.normal(size=(20, 7))
    naive = np.mean([np.sum((x[i] - xhat[i]) ** 2) / 7 for i in range(20)])
    assert recon_mse(x, xhat) == pytest.approx(naive, rel=1e-12)
    with pytest.raises(InputError, match=r"The 'x' and 'xhat' arguments must have the same shape; got \(20, 7\) and \(20, 6\)"):
        recon_mse(x, xhat[:, :6])


def test_collapse_metrics_bundle(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 5))
    mu = rng.normal(size=(200, 3)) * [1.0, 0.3, 0.0]
    logvar = rng.uniform(-2, 0, size=(200, 3))
    xhat = x + 0.1 * rng.normal(size=x.shape)
    cm = collapse_metrics(x, mu, logvar, xhat, seed=seed)
    assert cm.kl == pytest.approx(kl_total(mu, logvar), rel=1e-12)
    assert cm.au.count == active_units(mu).count
    assert cm.au_paper_posterior.count == active_units_posterior(logvar).count
    assert cm.au_paper_variance.count == active_units_paper_variance(mu).count
    assert cm.mi == mutual_information(mu, logvar, seed=seed)
    assert cm.mse == recon_mse(x, xhat)
    assert cm.collapsed is False and cm.n_rows == 200
    d = cm.to_dict()
    assert d["au"]["count"] == cm.au.count and len(d["kl_per_dim"]) == 3
    # an encoder at the prior: KL 0, collapsed
    prior = collapse_metrics(x, np.zeros((200, 3)), np.zeros((200, 3)), np.zeros_like(x))
    assert prior.kl == 0.0 and prior.collapsed and prior.au.count == 0 and abs(prior.mi) < 1e-9
    with pytest.raises(InputError, match=r"The 'x' and 'mu' arguments must have the same number of rows; got \(200, 5\) and \(10, 3\)"):
        collapse_metrics(x, mu[:10], logvar[:10], xhat)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_follow_cuda_inputs(seed):
    rng = np.random.default_rng(seed)
    xhat = torch.from_numpy(rng.normal(size=(64, 10)))
    cents = torch.from_numpy(rng.normal(size=(4, 3, 10)))
    on_gpu = clustering_losses(xhat.cuda(), cents.cuda())
    assert on_gpu.device.type == "cuda"
    np.testing.assert_allclose(on_gpu.cpu().numpy(), clustering_losses(xhat, cents).numpy(), rtol=1e-10)
    mu, lv = torch.from_numpy(rng.normal(size=(300, 4))), torch.from_numpy(rng.normal(size=(300, 4)) * 0.1)
    assert kl_per_dim(mu.cuda(), lv.cuda()).device.type == "cuda"
    assert np.isfinite(mutual_information(mu.cuda(), lv.cuda(), seed=seed))
