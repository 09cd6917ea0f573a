import numpy as np
import pytest
import torch

from hcdiag.errors import InputError
from hcdiag.losses import LossWeights, Schedule, gaussian_kl, reparameterize
from hcdiag.models import ModelConfig, build_model, encode_decode, parameter_vector


@pytest.mark.parametrize("family,shape", [("mlp", None), ("linear", None), ("conv", (1, 8, 8)), ("conv", (1, 14, 14))])
def test_models_encode_decode_shapes_and_config_round_trip(family, shape):
    N = int(np.prod(shape)) if shape else 12
    cfg = ModelConfig(family=family, input_dim=N, latent_dim=3, enc_widths=(16, 8), dec_widths=(8, 16),
                      image_shape=shape, channels=(4, 6))
    m = build_model(cfg, seed=0)
    x = torch.randn(5, N)
    mu, lv = m.encode(x)
    assert mu.shape == lv.shape == (5, 3)
    assert m.decode(mu).shape == (5, N)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_same_seed_same_init_and_global_rng_untouched(seed):
    cfg = ModelConfig(input_dim=7, latent_dim=2, enc_widths=(5,), dec_widths=(5,))
    torch.manual_seed(seed)
    before = torch.random.get_rng_state()
    a, b = build_model(cfg, seed=seed), build_model(cfg, seed=seed)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(parameter_vector(a.state_dict()), parameter_vector(b.state_dict()))


@pytest.mark.parametrize("family", ["mlp", "linear"])
def test_collapsed_state_is_exactly_collapsed(family, seed):
    """The T2 witness: q(z|x) = N(0, I) for every x (KL exactly 0) and xhat = c for every x."""
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, input_dim=9, latent_dim=4, enc_widths=(11,), dec_widths=(13,))
    m = build_model(cfg, seed=seed)
    c = torch.randn(9)
    sd, why = m.collapsed_state(c)
    assert why is None
    m.load_state_dict(sd)
    x = torch.randn(50, 9) * 3
    mu, lv, xhat = encode_decode(m, x)
    assert torch.count_nonzero(mu) == 0 and torch.count_nonzero(lv) == 0
    assert float(gaussian_kl(mu, lv).sum()) == 0.0
    assert torch.equal(xhat, c.expand(50, 9))
    z = torch.randn(50, 4)  # any z decodes to c too: the reconstruction is independent of z
    assert torch.equal(m.decode(z).detach(), c.expand(50, 9))


def test_conv_collapsed_state_says_why_not():
    m = build_model(ModelConfig(family="conv", input_dim=64, latent_dim=2, image_shape=(1, 8, 8), channels=(2, 3)))
    sd, why = m.collapsed_state(torch.zeros(64))
    assert sd is None and "one bias per channel" in why


def test_model_config_errors():
    with pytest.raises(InputError, match="model family must be one of"):
        ModelConfig(family="transformer")
    with pytest.raises(InputError, match=r"image_shape \(1, 3, 3\) has 9 values but input_dim is 10"):
        ModelConfig(family="conv", input_dim=10, image_shape=(1, 3, 3))
    with pytest.raises(InputError, match="conv family needs image_shape"):
        ModelConfig(family="conv", input_dim=10)


def test_gaussian_kl_matches_torch_distributions(seed):
    g = torch.Generator().manual_seed(seed)
    mu, lv = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * lv))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl(mu, lv), torch.distributions.kl_divergence(q, p), rtol=1e-12, atol=1e-12)


def test_reparameterize_moments_and_generator_reproducibility(seed):
    mu, lv = torch.full((20000, 1), 1.5), torch.full((20000, 1), np.log(0.25))
    z1 = reparameterize(mu, lv, torch.Generator().manual_seed(seed))
    z2 = reparameterize(mu, lv, torch.Generator().manual_seed(seed))
    assert torch.equal(z1, z2)
    # Monte Carlo: 20000 draws, std error of the mean 0.5/141 ~ 0.0035
    assert abs(float(z1.mean()) - 1.5) < 0.02 and abs(float(z1.std()) - 0.5) < 0.02


@pytest.mark.parametrize("conv,recon,cluster", [("literal", 1 / 4, 1.0), ("scaled", 1 / 4, 1 / 4), ("mean", 1 / 40, 1 / 10)])
def test_loss_weights_per_convention(conv, recon, cluster):
    w = LossWeights.for_convention(conv, s2=2.0, input_dim=10)
    assert w.recon == pytest.approx(recon) and w.cluster == pytest.approx(cluster)


def test_loss_weights_errors():
    with pytest.raises(InputError, match="loss convention must be one of literal, scaled, mean. Got 'sum'"):
        LossWeights.for_convention("sum", 1.0, 3)
    with pytest.raises(InputError, match="s2 must be > 0"):
        LossWeights.for_convention("literal", 0.0, 3)


def test_schedules():
    assert Schedule("linear", 1, 4).value(0) == 1 and Schedule("linear", 1, 4).value(0.5) == 2.5
    assert Schedule("linear", 1, 4).value(7) == 4
    assert Schedule("warmup", 1, 4).value(0) == 0 and Schedule("warmup", 1, 4).value(0.25) == 1
    assert Schedule("constant", 2, 4).value(0.9) == 2
    with pytest.raises(InputError, match="schedule must be constant, linear or warmup"):
        Schedule("cosine")
