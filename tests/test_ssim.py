"""hcdiag.ssim against oracles: scikit-image's SSIM, a naive loop over window positions, pytorch_msssim's
MS-SSIM, and a naive per-scale composition (naive 2x2 pooling, the module's own per-scale terms); the
identities (x vs x is 1, symmetry, [0, 1], monotone in the noise), the small-image rule and the error
messages."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcdiag.errors import InputError
from hcdiag.ssim import STANDARD_WEIGHTS, ms_ssim, ms_ssim_params, ssim, ssim_terms


def _pair(seed, shape, noise=0.2, dtype=torch.float64):
    """Images in [0, 1] and a noisy copy (not clipped, so the reconstruction may leave [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = x + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def naive_terms(x, y, *, data_range, win_size=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM and contrast-structure means per channel of one image (C, H, W), a loop over window positions."""
    r = win_size // 2
    g1 = np.array([math.exp(-((i - r) ** 2) / (2 * sigma ** 2)) for i in range(win_size)])
    w = np.outer(g1, g1) / g1.sum() ** 2
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    n_ch, h, wd = x.shape
    ssim_out, cs_out = np.zeros(n_ch), np.zeros(n_ch)
    for c in range(n_ch):
        s_map, cs_map = [], []
        for i in range(h - win_size + 1):
            for j in range(wd - win_size + 1):
                px, py = x[c, i:i + win_size, j:j + win_size], y[c, i:i + win_size, j:j + win_size]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                cs = (2 * cxy + c2) / (vx + vy + c2)
                s_map.append((2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs)
                cs_map.append(cs)
        ssim_out[c], cs_out[c] = np.mean(s_map), np.mean(cs_map)
    return ssim_out, cs_out


def naive_pool(a):
    """2x2 block means of (B, C, H, W), an odd last row / column dropped, by a loop over output pixels."""
    b, c, h, w = a.shape
    out = np.zeros((b, c, h // 2, w // 2))
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, :, i, j] = a[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(2, 3))
    return out


def naive_ms_ssim(x, y, *, data_range, win_size, weights):
    """Wang et al. 2003 composed by hand: cs at the finer scales, ssim at the coarsest, each clamped at 0,
    raised to its weight, multiplied, then averaged over channels. Per-scale terms from ssim_terms."""
    x, y = x.numpy().astype(np.float64), y.numpy().astype(np.float64)
    total = 1.0
    for j, w in enumerate(weights):
        t = ssim_terms(torch.from_numpy(x), torch.from_numpy(y), data_range=data_range, win_size=win_size)
        last = j == len(weights) - 1
        total = total * np.maximum((t.ssim if last else t.cs).numpy(), 0.0) ** w  # (B, C)
        if not last:
            x, y = naive_pool(x), naive_pool(y)
    return total.mean(1)


# ---------------------------------------------------------------------------------------------------------
# single scale


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (2, 3, 20, 27), (4, 11, 11)])
def test_ssim_equals_skimage(seed, shape):
    skimage_metrics = pytest.importorskip("skimage.metrics")
    x, y = _pair(seed, shape)
    data_range = float(np.random.default_rng(seed).uniform(0.5, 2.0))
    ours = ssim(x, y, data_range=data_range)
    ref = [skimage_metrics.structural_similarity(
        x[i].numpy(), y[i].numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=data_range, **({"channel_axis": 0} if len(shape) == 4 else {})) for i in range(shape[0])]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("win_size, shape", [(11, (2, 2, 15, 17)), (7, (2, 1, 9, 12)), (3, (1, 1, 5, 3))])
def test_ssim_terms_equal_a_naive_loop(seed, win_size, shape):
    x, y = _pair(seed, shape, noise=0.3)
    t = ssim_terms(x, y, data_range=1.0, win_size=win_size)
    for b in range(shape[0]):
        s, cs = naive_terms(x[b].numpy(), y[b].numpy(), data_range=1.0, win_size=win_size)
        np.testing.assert_allclose(t.ssim[b].numpy(), s, rtol=0, atol=1e-12)
        np.testing.assert_allclose(t.cs[b].numpy(), cs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ssim(x, y, data_range=1.0, win_size=win_size).numpy(), t.ssim.mean(1).numpy(),
                               rtol=0, atol=0)


def test_ssim_dtypes(seed):
    x, y = _pair(seed, (2, 1, 12, 12))
    out32 = ssim(x.float(), y.float(), data_range=1.0)
    assert out32.dtype == torch.float32 and ssim(x, y, data_range=1.0).dtype == torch.float64
    np.testing.assert_allclose(out32.numpy(), ssim(x, y, data_range=1.0).numpy(), atol=1e-5)  # float32 rounding
    u = (x * 255).round().to(torch.uint8)
    v = (y.clamp(0, 1) * 255).round().to(torch.uint8)
    np.testing.assert_allclose(ssim(u, v.numpy(), data_range=255).numpy(),
                               ssim(u.double(), v.double(), data_range=255).numpy(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# multi-scale


@pytest.mark.parametrize("dtype, channels", [(torch.float64, 1), (torch.float32, 3)])
@pytest.mark.parametrize("noise", [0.05, 0.3, 1.0])
def test_ms_ssim_equals_pytorch_msssim(seed, dtype, channels, noise):
    pm = pytest.importorskip("pytorch_msssim")
    x, y = _pair(seed, (3, channels, 176, 176), noise=noise, dtype=dtype)
    res = ms_ssim(x, y, data_range=1.0, return_params=True)
    assert res.params.scales == 5 and res.params.win_size == 11 and res.params.weights == STANDARD_WEIGHTS
    # pytorch_msssim builds its window in float32; hand it the same Gaussian in the images' dtype
    g = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
    win = torch.tensor(g / g.sum(), dtype=dtype).view(1, 1, 1, 11).repeat(channels, 1, 1, 1)
    ref = pm.ms_ssim(x, y, data_range=1.0, size_average=False, win=win)
    np.testing.assert_allclose(res.value.numpy(), ref.numpy(), rtol=0, atol=1e-10 if dtype == torch.float64 else 1e-5)
    # anti-correlated images: every cs is negative, clamped to 0 in both
    anti = pm.ms_ssim(x, 1 - x, data_range=1.0, size_average=False, win=win)
    np.testing.assert_allclose(ms_ssim(x, 1 - x, data_range=1.0).numpy(), anti.numpy(), atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 1, 176, 176), (2, 2, 100, 90), (3, 1, 45, 37), (3, 1, 28, 28),
                                   (4, 8, 8), (2, 1, 5, 9)])
def test_ms_ssim_equals_a_naive_composition(seed, shape):
    x, y = _pair(seed, shape, noise=float(np.random.default_rng(seed).uniform(0.05, 0.8)))
    res = ms_ssim(x, y, data_range=1.0, return_params=True)
    p = res.params
    naive = naive_ms_ssim(x if len(shape) == 4 else x[:, None], y if len(shape) == 4 else y[:, None],
                          data_range=1.0, win_size=p.win_size, weights=p.weights)
    np.testing.assert_allclose(res.value.numpy(), naive, rtol=0, atol=1e-12)
    assert res.per_scale.shape == (p.scales, shape[0], shape[1] if len(shape) == 4 else 1)
    assert p.shapes[-1] == (shape[-2] >> (p.scales - 1), shape[-1] >> (p.scales - 1))


def test_explicit_window_and_weights_are_honoured(seed):
    x, y = _pair(seed, (2, 1, 28, 28), noise=0.3)
    res = ms_ssim(x, y, data_range=1.0, win_size=5, weights=(0.5, 0.3, 0.2), return_params=True)
    assert (res.params.scales, res.params.win_size, res.params.weights) == (3, 5, (0.5, 0.3, 0.2))
    np.testing.assert_allclose(res.value.numpy(), naive_ms_ssim(x, y, data_range=1.0, win_size=5,
                                                                weights=(0.5, 0.3, 0.2)), atol=1e-12)
    # an explicit window without weights: the largest M <= 5 that fits, the weights renormalised
    p = ms_ssim(x, y, data_range=1.0, win_size=3, return_params=True).params
    assert p.scales == 4 and p.win_size == 3  # 28, 14, 7, 3 hold 3x3; 1 does not
    np.testing.assert_allclose(p.weights, np.array(STANDARD_WEIGHTS[:4]) / sum(STANDARD_WEIGHTS[:4]), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# identities


@pytest.mark.parametrize("shape", [(3, 1, 176, 176), (4, 1, 8, 8), (2, 3, 28, 28)])
def test_identity_symmetry_and_range(seed, shape):
    x, y = _pair(seed, shape, noise=0.5)
    # 1 up to rounding: the batched matrix products may round the (equal) statistics of x and y differently
    np.testing.assert_allclose(ms_ssim(x, x, data_range=1.0).numpy(), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ms_ssim(x, y, data_range=1.0).numpy(), ms_ssim(y, x, data_range=1.0).numpy(),
                               rtol=0, atol=1e-14)
    for other in (y, 1 - x, torch.zeros_like(x), x + 5.0):
        v = ms_ssim(x, other, data_range=1.0)
        assert torch.all(v >= 0) and torch.all(v <= 1 + 1e-12)


def test_ms_ssim_decreases_as_noise_grows(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 64, 64, generator=g, dtype=torch.float64)
    n = torch.randn(x.shape, generator=g, dtype=torch.float64)
    vals = torch.stack([ms_ssim(x, x + a * n, data_range=1.0) for a in (0.0, 0.02, 0.1, 0.3, 1.0, 3.0)])  # (6, B)
    assert torch.allclose(vals[0], torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    # strictly decreasing until the clamp at 0 (negative contrast-structure terms are clipped, as in the
    # reference implementations): heavy noise can reach 0 at 1.0 and stay there at 3.0 (seed 1096221318)
    assert torch.all((vals[1:] < vals[:-1]) | ((vals[1:] == 0) & (vals[:-1] >= 0)))
    assert torch.all(vals[2] > 0)  # 0.1 noise keeps every image well above the clamp


@settings(max_examples=40, deadline=None)
@given(h=st.integers(3, 40), w=st.integers(3, 40), seed=st.integers(0, 2 ** 31 - 1),
       noise=st.floats(0.0, 3.0), data_range=st.floats(0.1, 10.0))
def test_properties_on_any_size(h, w, seed, noise, data_range):
    x, y = _pair(seed, (2, 1, h, w), noise=noise)
    v = ms_ssim(x, y, data_range=data_range)
    assert torch.all(v >= 0) and torch.all(v <= 1 + 1e-12)
    assert torch.allclose(v, ms_ssim(y, x, data_range=data_range), rtol=0, atol=1e-13)
    np.testing.assert_allclose(ms_ssim(x, x, data_range=data_range).numpy(), 1.0, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# the small-image rule


def _rule(h, w):
    """The documented rule, spelled out: window 11 shrunk to the largest odd size <= the smaller side; M the
    largest M <= 5 whose coarsest image holds the window; the first M weights, renormalised when M < 5."""
    side = min(h, w)
    win = min(11, max(k for k in range(1, side + 1) if k % 2))
    m = max(k for k in range(1, 6) if side // 2 ** (k - 1) >= win)
    ws = STANDARD_WEIGHTS if m == 5 else tuple(np.array(STANDARD_WEIGHTS[:m]) / sum(STANDARD_WEIGHTS[:m]))
    return m, win, ws


@pytest.mark.parametrize("h, w", [(3, 3), (4, 5), (8, 8), (10, 12), (11, 11), (21, 30), (22, 22), (28, 28), (32, 32),
                                  (43, 60), (44, 44), (87, 88), (88, 88), (175, 200), (176, 176), (500, 300)])
def test_small_image_rule(h, w):
    p = ms_ssim_params(h, w)
    m, win, ws = _rule(h, w)
    assert (p.scales, p.win_size) == (m, win)
    np.testing.assert_allclose(p.weights, ws, rtol=1e-12)
    assert math.isclose(sum(p.weights), 1.0 if m < 5 else sum(STANDARD_WEIGHTS))
    assert p.shapes == tuple((h >> j, w >> j) for j in range(m))
    assert p.to_dict()["weights"] == list(p.weights)


def test_small_images_of_the_paper(seed):
    # CIFAR-10 at 8x8 (Li et al. 2024): one scale, a 7x7 window, MS-SSIM = SSIM (7x7) clamped at 0
    x, y = _pair(seed, (5, 1, 8, 8), noise=0.4)
    res = ms_ssim(x, y, data_range=1.0, return_params=True)
    assert (res.params.scales, res.params.win_size, res.params.weights) == (1, 7, (1.0,))
    assert "shrunk" in res.params.rule
    np.testing.assert_allclose(res.value.numpy(), ssim(x, y, data_range=1.0, win_size=7).clamp_min(0).numpy(),
                               rtol=0, atol=1e-14)
    # MNIST-sized 28x28: two scales of the 11x11 window, weights 0.0448 and 0.2856 renormalised
    p = ms_ssim(*_pair(seed, (2, 28, 28)), data_range=1.0, return_params=True).params
    assert (p.scales, p.win_size) == (2, 11)
    np.testing.assert_allclose(p.weights, [0.0448 / 0.3304, 0.2856 / 0.3304], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("call, match", [
    (lambda x: ms_ssim(x, x[:, :, :7], data_range=1.0),
     r"^x and y must have the same shape; got \(2, 1, 8, 8\) and \(2, 1, 7, 8\)\. Pass each image beside its own "
     r"reconstruction\.$"),
    (lambda x: ssim(x[0, 0], x[0, 0], data_range=1.0),
     r"^x must hold images of shape \(B, C, H, W\) or \(B, H, W\); got shape \(8, 8\)\. Add a batch axis for a "
     r"single image\.$"),
    (lambda x: ms_ssim(x.index_put((torch.tensor([0]),), torch.tensor(float("nan"), dtype=x.dtype)), x, data_range=1.0),
     r"^x holds 64 non-finite value\(s\) \(NaN or inf\); SSIM is undefined there, so clean or drop those images\.$"),
    (lambda x: ssim(x, x.clone().fill_(float("inf")), data_range=1.0, win_size=3),
     r"^y holds 128 non-finite value\(s\) \(NaN or inf\); SSIM is undefined there, so clean or drop those images\.$"),
    (lambda x: ms_ssim(x[:, :, :2, :2], x[:, :, :2, :2], data_range=1.0),
     r"^The images are 2x2, too small for even one MS-SSIM scale \(the smallest window is 3x3\); pass images of at "
     r"least 3x3 pixels\.$"),
    (lambda x: ssim(x, x, data_range=1.0),
     r"^The images are 8x8, smaller than the 11x11 window; pass an odd win_size <= 8, or use ms_ssim, whose rule "
     r"shrinks the window\.$"),
    (lambda x: ms_ssim(x, x, data_range=1.0, win_size=9),
     r"^The images are 8x8, smaller than the 9x9 window; pass an odd win_size <= 8, or win_size=None to let the "
     r"rule shrink it\.$"),
    (lambda x: ms_ssim(x, x, data_range=1.0, weights=[0.5, 0.5]),
     r"^The images are 8x8: 2 weights ask for 2 scales but only 1 hold a 7x7 window; pass at most 1 weight\(s\), "
     r"or weights=None to let the rule pick\.$"),
    (lambda x: ms_ssim(x, x, data_range=1.0, weights=[0.5, -0.5]),
     r"^weights must be a non-empty list of finite numbers > 0 \(one per scale, finest first\)\. "
     r"Got \[0\.5, -0\.5\]\.$"),
    (lambda x: ms_ssim(x, x, data_range=1.0, weights=[]),
     r"^weights must be a non-empty list of finite numbers > 0 \(one per scale, finest first\)\. Got \[\]\.$"),
    (lambda x: ms_ssim(x, x, data_range=0),
     r"^data_range must be a finite number > 0 \(the span of possible pixel values, e\.g\. 1\.0 for images in "
     r"\[0, 1\]\)\. Got 0\.$"),
    (lambda x: ssim(x, x, data_range=float("nan"), win_size=3),
     r"^data_range must be a finite number > 0 .*Got nan\.$"),
    (lambda x: ms_ssim(x, x, data_range=True), r"^data_range must be a finite number > 0 .*Got True\.$"),
    (lambda x: ms_ssim(x, x, data_range=1.0, sigma=-1.0),
     r"^sigma must be a finite number > 0 \(the Gaussian window's standard deviation, in pixels\)\. Got -1\.0\.$"),
    (lambda x: ms_ssim(x, x, data_range=1.0, k2=0.0),
     r"^k2 must be a finite number > 0 \(the contrast constant, 0\.03 by default\)\. Got 0\.0\.$"),
    (lambda x: ssim(x, x, data_range=1.0, win_size=4), r"^win_size must be an odd integer >= 3\. Got 4\.$"),
    (lambda x: ms_ssim(x, x, data_range=1.0, win_size=1), r"^win_size must be an odd integer >= 3\. Got 1\.$"),
    (lambda x: ms_ssim(x[:0], x[:0], data_range=1.0),
     r"^x and y hold no pixels \(shape \(0, 1, 8, 8\)\); pass at least one image\.$"),
    (lambda x: ms_ssim(x.to(torch.complex128), x.to(torch.complex128), data_range=1.0),
     r"^x must be real-valued; got dtype torch\.complex128\.$"),
    (lambda x: ms_ssim("images", x, data_range=1.0),
     r"^x must be a tensor or array of images; it could not be read as one \(.*\)\.$"),
])
def test_bad_input_is_one_line(call, match):
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(InputError, match=match) as info:
        call(x)
    assert "\n" not in str(info.value)
