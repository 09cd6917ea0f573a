"""Algorithm 2 and its controls (hcdiag.diffusion.train): budgets, the halving rule, and a trained denoiser
against the closed-form posterior mean of Gaussian data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hcdiag.diffusion.model import Tables, model_eps, posterior_mean
from hcdiag.diffusion.train import DiffusionConfig, train_diffusion, validation_loss
from hcdiag.errors import InputError

from diffusion_helpers import trained_on_gaussian  # noqa: I001 (tests/ is on sys.path)

SMALL = dict(widths=(16,), emb_dim=8, batch_size=32, val_rows=64, val_draws=2, T=100)


def _mixture(seed, n=400):
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 3, size=(4, 2))
    return (c[rng.integers(0, 4, n)] + 0.3 * rng.normal(size=(n, 2))).astype(np.float32)


def test_step_budgets_are_equal_across_methods(seed):
    x = _mixture(seed)
    E = 3
    assert DiffusionConfig(R=8, epochs_per_round=E).budget() == 8 * E + 4 * E
    runs = {m: train_diffusion(x, DiffusionConfig(method=m, R=8, epochs_per_round=E, seed=seed % 1000, **SMALL))
            for m in ("consensus", "single", "logsnr")}
    assert {m: r["steps"] for m, r in runs.items()} == {m: 12 * E for m in runs}
    assert [r["model"].conditioning for r in runs.values()] == ["schedule", "timestep", "logsnr"]


def test_algorithm_2_keeps_the_half_with_the_smallest_validation_loss(seed):
    x = _mixture(seed)
    cfg = DiffusionConfig(method="consensus", R=8, epochs_per_round=4, seed=seed % 1000, **SMALL)
    out = train_diffusion(x, cfg)
    rounds = out["rounds"]
    assert [len(r["active"]) for r in rounds] == [8, 4] and len(rounds[-1]["kept"]) == 2
    for i, r in enumerate(rounds):
        order = sorted(zip(r["val_loss"], r["active"]))
        assert r["kept"] == sorted(a for _, a in order[:len(r["active"]) // 2])
        if i + 1 < len(rounds):
            assert rounds[i + 1]["active"] == r["kept"]
    # the recorded losses of the last round are the validation losses of the final model on those schedules
    xv = torch.as_tensor(x[out["val_rows"]])
    last = rounds[-1]
    for r, v in zip(last["active"], last["val_loss"]):
        assert validation_loss(out["model"], xv, Tables(out["schedules"][r]), r, draws=2, seed=cfg.seed + 2) == \
            pytest.approx(v, rel=1e-6)
    assert set(out["train_rows"]).isdisjoint(out["val_rows"]) and len(out["val_rows"]) == 64


def test_a_trained_denoiser_matches_the_gaussian_posterior_mean_at_moderate_noise(seed, one_thread):
    lam = 4.0
    _, out, tab = trained_on_gaussian(seed, lam)
    for t in (50, 200):  # SNR 27 and 1.5: the gain sqrt(a) lam / (a lam + 1 - a) of E[x0 | x_t] (closed form)
        a = float(tab.abar[t])
        xs = torch.linspace(-1, 1, 21, dtype=torch.float64)[:, None] * np.sqrt(a * lam + 1 - a)
        with torch.no_grad():
            pm = posterior_mean(model_eps(out["model"], tab), xs, torch.full((21,), t), tab)
        gain = float(np.polyfit(xs[:, 0].numpy(), pm[:, 0].numpy(), 1)[0])
        assert gain == pytest.approx(np.sqrt(a) * lam / (a * lam + 1 - a), rel=0.06), t


@pytest.mark.parametrize("kw,msg", [(dict(R=6), "needs R = 2\\^k >= 4 schedules"), (dict(R=2), "with 2 it trains nothing"), (dict(method="ema"), "must be one of"),
                                    (dict(epochs_per_round=0), "'epochs_per_round' parameter must be an integer >= 1"),
                                    (dict(lr=-1.0), "'lr' parameter must be a finite number > 0")])
def test_bad_configs_get_one_line(kw, msg):
    with pytest.raises(InputError, match=msg):
        DiffusionConfig(**kw)
    with pytest.raises(InputError, match="needs a finite"):
        train_diffusion(np.array([[np.nan, 1.0], [0.0, 1.0]]), DiffusionConfig(**SMALL))


def test_default_widths_carry_x_t_through_every_layer_and_are_recorded_resolved(seed, one_thread):
    """max(128, 2 d) per layer: 128 up to d = 64 (digits, the synthetic data: earlier runs unchanged), 392 for
    Fashion-MNIST's 196 (128 could not carry x_t and lost to the data-free predictor); the run records them."""
    from hcdiag.diffusion.runfile import run_dict, validate
    from hcdiag.diffusion.train import default_widths

    assert default_widths(2) == default_widths(64) == (128, 128, 128) and default_widths(196) == (392, 392, 392)
    assert DiffusionConfig().widths is None and DiffusionConfig().resolved(100).widths == (200, 200, 200)
    assert DiffusionConfig(widths=(8,)).resolved(100).widths == (8,)  # given widths are kept
    x = np.random.default_rng(seed).normal(size=(700, 70)).astype(np.float32)
    out = train_diffusion(x, DiffusionConfig(method="single", R=4, T=50, epochs_per_round=1, seed=seed % 1000))
    assert out["config"].widths == (140, 140, 140) and out["model"].config["widths"] == [140, 140, 140]

    from types import SimpleNamespace

    d = run_dict(out, SimpleNamespace(spec={"name": "array"}, x=x))
    assert d["config"]["widths"] == [140, 140, 140]
    d["config"]["widths"] = None
    with pytest.raises(InputError, match=r"config\.widths is missing \(a run file records the hidden widths it was "
                                         r"trained with\); fix the producer\."):
        validate(d)
