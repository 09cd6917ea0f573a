"""The DDPM parts (hcdiag.diffusion.model) against oracles: naive embeddings, numerical integration of the
Gaussian posterior, and samplers driven by the exact epsilon-predictor of Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hcdiag.diffusion import Schedule
from hcdiag.diffusion.model import Denoiser, Tables, gaussian_eps, posterior_mean, q_sample, sample, sinusoidal
from hcdiag.errors import InputError


def test_sinusoidal_embedding_matches_a_naive_loop(seed):
    v = torch.tensor([0.0, 1.0, 17.0, 999.0])
    e = sinusoidal(v, 9)
    for i, x in enumerate(v.tolist()):
        for j in range(4):
            w = 10_000 ** (-j / 4)
            assert abs(e[i, j].item() - math.sin(x * w)) < 1e-5 and abs(e[i, 4 + j].item() - math.cos(x * w)) < 1e-5
        assert e[i, 8].item() == 0.0  # odd width: zero-padded


def test_forward_process_and_tweedie_against_numerical_integration(seed):
    rng = np.random.default_rng(seed)
    tab = Tables(Schedule("cosine", 200))
    m, c = float(rng.normal()), float(rng.uniform(0.2, 3.0))
    eps_fn = gaussian_eps(np.array([m]), np.array([[c]]), tab)
    grid = np.linspace(m - 12 * math.sqrt(c), m + 12 * math.sqrt(c), 20001)
    for t in (1, 50, 120, 199):
        a = float(tab.abar[t])
        xt = float(rng.normal()) * 2
        # p(x0 | x_t) ~ N(x0; m, c) N(x_t; sqrt(a) x0, 1 - a), integrated on a grid
        w = np.exp(-(grid - m) ** 2 / (2 * c) - (xt - math.sqrt(a) * grid) ** 2 / (2 * (1 - a)))
        naive = float((w * grid).sum() / w.sum())
        got = posterior_mean(eps_fn, torch.tensor([[xt]], dtype=torch.float64), torch.tensor([t]), tab)
        assert abs(got.item() - naive) < 1e-6 * max(1, abs(naive)), t
    x0 = torch.randn(5, 3, dtype=torch.float64)
    e = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([1, 2, 50, 150, 200])
    a = tab.abar[t][:, None]
    assert torch.allclose(q_sample(x0, t, e, tab), a.sqrt() * x0 + (1 - a).sqrt() * e)


@pytest.mark.parametrize("method,steps", [("ddpm", None), ("ddim", 100)])
def test_the_samplers_with_the_exact_denoiser_reproduce_gaussian_data(method, steps, seed):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(2, 2))
    cov = A @ A.T + 0.3 * np.eye(2)
    mean = rng.normal(size=2)
    tab = Tables(Schedule("linear", 1000))
    g = torch.Generator().manual_seed(seed % 2**31)
    n = 3000
    x = sample(gaussian_eps(mean, cov, tab), tab, n, 2, method=method, steps=steps, generator=g).numpy()
    se = np.sqrt(np.diag(cov) / n)
    assert (np.abs(x.mean(0) - mean) < 5 * se + 0.02).all()
    emp = np.cov(x, rowvar=False)
    # covariance within sampling error (relative sd of a variance ~ sqrt(2/n) ~ 2.6%) and discretisation
    assert np.abs(emp - cov).max() < 0.15 * np.abs(cov).max()


def test_denoiser_conditionings():
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    t = torch.tensor([1, 10, 10, 500])
    ls = torch.tensor([3.0, 1.0, 1.0, -5.0])
    sch = Denoiser(3, widths=(16,), conditioning="schedule", n_schedules=4)
    a = sch(x, t, ls, torch.tensor([0, 0, 1, 3]))
    b = sch(x, t, ls, torch.tensor([0, 0, 2, 3]))
    assert a.shape == (4, 3) and torch.equal(a[[0, 1, 3]], b[[0, 1, 3]]) and not torch.equal(a[2], b[2])
    snr = Denoiser(3, widths=(16,), conditioning="logsnr")
    # the noise-level model sees log SNR only: another timestep at the same noise level gives the same output
    assert torch.equal(snr(x, t, ls), snr(x, t + 7, ls))
    with pytest.raises(InputError, match="The 'conditioning' parameter must be one of timestep, schedule, logsnr"):
        Denoiser(3, conditioning="sigma")


def test_sampler_arguments_are_checked():
    tab = Tables(Schedule("linear", 10))
    eps = gaussian_eps(np.zeros(1), np.eye(1), tab)
    with pytest.raises(InputError, match="The sampler must be ddpm or ddim"):
        sample(eps, tab, 2, 1, method="euler")
    with pytest.raises(InputError, match=r"DDIM steps must lie in 1..T = 10"):
        sample(eps, tab, 2, 1, method="ddim", steps=11)
