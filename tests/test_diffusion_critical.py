"""The measured critical timestep (hcdiag.diffusion.critical): the normalized gain of E[x0 | x_t] against the
closed form of Gaussian data, for the exact denoiser and for a trained one, at every noise level."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hcdiag.diffusion import Schedule
from hcdiag.diffusion.critical import crossing, gaussian_gain, normalized_gain
from hcdiag.diffusion.model import Tables, gaussian_eps, model_eps
from hcdiag.errors import InputError

from diffusion_helpers import trained_on_gaussian  # noqa: I001 (tests/ is on sys.path)

TS = [1, 50, 200, 400, 500, 600, 700, 800, 900, 1000]


def test_the_exact_denoiser_has_the_closed_form_gain_along_each_eigenvector(seed):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    lams = np.array([6.0, 1.0, 0.2])
    cov = Q @ np.diag(lams) @ Q.T
    tab = Tables(Schedule("cosine", 1000))
    x0 = torch.as_tensor(rng.multivariate_normal(np.zeros(3), cov, size=200))
    eps = gaussian_eps(np.zeros(3), cov, tab)
    for j in range(3):  # the gain is linear in x_t: exact at every point, for every noise draw
        g = normalized_gain(eps, tab, x0, torch.as_tensor(Q[:, j]), TS, generator=torch.Generator().manual_seed(0))
        np.testing.assert_allclose(g, gaussian_gain(lams[j], tab, TS), atol=1e-9)


def test_a_trained_denoiser_tracks_the_closed_form_gain_even_at_high_noise(seed, one_thread):
    lam = 4.0
    x, out, tab = trained_on_gaussian(seed, lam)
    g = normalized_gain(model_eps(out["model"], tab), tab, torch.as_tensor(x[:1000]), torch.ones(1), TS,
                        generator=torch.Generator().manual_seed(seed % 1000))
    theory = gaussian_gain(lam, tab, TS)
    # where Tweedie's E[x0 | x_t] is off by x10 (t = 1000), the normalized gain stays within a few hundredths
    assert np.abs(g - theory).max() < 0.1, (g, theory)
    assert crossing(TS, g) == pytest.approx(crossing(TS, theory), rel=0.08)


def test_crossing_interpolates_and_says_none():
    assert crossing([1, 2, 3], [0.9, 0.7, 0.3]) == pytest.approx(2.5)
    assert crossing([10, 20], [0.4, 0.1]) == 10.0 and crossing([1, 2], [0.9, 0.8]) is None


def test_bad_arguments_get_one_line():
    tab = Tables(Schedule("linear", 10))
    eps = gaussian_eps(np.zeros(2), np.eye(2), tab)
    with pytest.raises(InputError, match=r"rows \(n, d\) and a direction \(d,\)"):
        normalized_gain(eps, tab, torch.zeros(4, 2), torch.ones(3), [1])
    with pytest.raises(InputError, match="must be non-zero"):
        normalized_gain(eps, tab, torch.zeros(4, 2), torch.zeros(2), [1])
    with pytest.raises(InputError, match=r"Timesteps must lie in 1..T = 10; got 11"):
        normalized_gain(eps, tab, torch.zeros(4, 2), torch.ones(2), [11])
