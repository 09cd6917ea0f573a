"""SSIM and MS-SSIM between batches of images (the paper's Table 2 column "MS-SSIM", higher is better).

Definitions (Wang, Bovik, Sheikh & Simoncelli 2004 for SSIM; Wang, Simoncelli & Bovik 2003 for MS-SSIM):

* Local statistics under a normalised Gaussian window ``w`` (``win_size`` taps, std ``sigma``), applied
  separably and only where the window fits ("valid" positions, no padding): means ``mu_x, mu_y``,
  population variances ``s_x^2, s_y^2`` and covariance ``s_xy``.
* ``l = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)``, ``cs = (2 s_xy + C2) / (s_x^2 + s_y^2 + C2)`` with
  ``C1 = (k1 * data_range)^2``, ``C2 = (k2 * data_range)^2``; SSIM is the mean of the map ``l * cs``.
* MS-SSIM over ``M`` scales (2x2 average pooling between scales):
  ``prod_{j < M} mean(cs_j)^{w_j} * mean(l_M cs_M)^{w_M}``: contrast-structure at every scale, luminance at
  the coarsest only, the means taken per channel, then averaged over channels (one value per image).

Choices that the paper does not pin down, documented here once:

* **Negative terms are clamped to 0** before the (fractional) power, as ``pytorch_msssim`` (its
  ``nonnegative_ssim`` / ReLU on ``cs``) does: a negative mean contrast-structure means the image and its
  reconstruction are anti-correlated at that scale, and ``negative ** 0.2856`` is undefined (NaN). With the
  clamp MS-SSIM lies in ``[0, 1]``.
* **Pooling** is ``avg_pool2d(kernel 2, stride 2)``: an odd row or column is dropped (floor).
* **Small images** (the paper's CIFAR-10 is 8x8 grayscale, Li et al. 2024, where five scales of an 11x11
  window cannot fit). :func:`ms_ssim_params` applies one rule, and :func:`ms_ssim` records its outcome:

  - ``win_size=None``: the window is 11, shrunk to the largest odd size <= the image's smaller side when
    that side is below 11 (``sigma`` stays 1.5); never below 3 (images under 3x3 are refused).
  - ``weights=None``: the number of scales ``M`` is the largest ``M <= 5`` such that the coarsest image
    (``M - 1`` halvings) still holds the window; the weights are the first ``M`` of the standard
    ``0.0448, 0.2856, 0.3001, 0.2363, 0.1333``, renormalised to sum to 1 when ``M < 5`` (with all five
    the published weights are used unchanged, as in every reference implementation; they sum to 1.0001).
  - An explicit ``win_size`` or ``weights`` is honoured exactly (one scale per weight, unnormalised); an
    image too small for it is refused.

  So 8x8 images give one scale with a 7x7 window (MS-SSIM = SSIM, clamped), 28x28 two scales with an
  11x11 window and weights ``(0.1356, 0.8644)``, 176x176 and larger the standard five scales.

>>> import torch
>>> x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
>>> ms_ssim(x, x, data_range=1.0).tolist()
[1.0, 1.0]
>>> p = ms_ssim_params(8, 8)
>>> (p.scales, p.win_size, p.weights)
(1, 7, (1.0,))
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from hcdiag.errors import InputError, marked

# Wang, Simoncelli & Bovik 2003, fine to coarse
STANDARD_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
DEFAULT_WIN_SIZE = 11
MIN_WIN_SIZE = 3


@dataclass(frozen=True)
class SSIMTerms:
    """Per-image, per-channel means of the SSIM map (``ssim``, luminance times contrast-structure) and of
    the contrast-structure map (``cs``), both of shape (B, C); unclamped."""

    ssim: torch.Tensor
    cs: torch.Tensor


@dataclass(frozen=True)
class MSSSIMParams:
    """The effective MS-SSIM settings for one image size (the outcome of the small-image rule).

    ``shapes`` are the (H, W) of the image at each scale, finest first; ``weights`` has one exponent per
    scale, finest first; ``rule`` says whether the window and weights were chosen by the rule or given.
    """

    scales: int
    win_size: int
    sigma: float
    weights: tuple[float, ...]
    shapes: tuple[tuple[int, int], ...]
    rule: str

    def to_dict(self) -> dict:
        return {"scales": self.scales, "win_size": self.win_size, "sigma": self.sigma,
                "weights": list(self.weights), "shapes": [list(s) for s in self.shapes], "rule": self.rule}


@dataclass(frozen=True)
class MSSSIMResult:
    """``value`` (B,): MS-SSIM per image (mean over channels); ``params``: the effective settings;
    ``per_scale`` (M, B, C): the per-scale factors after clamping at 0 and before the powers (``cs`` at
    the first ``M - 1`` scales, ``ssim`` at the last), so ``value = prod_j per_scale[j] ** w_j``, averaged
    over channels."""

    value: torch.Tensor
    params: MSSSIMParams
    per_scale: torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# validation


def _number(v, name: str, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v <= 0:
        raise InputError(f"{name} must be a finite number > 0{what}. Got {v!r}.")
    return float(v)


def _constants(data_range, sigma, k1, k2) -> tuple[float, float, float, float]:
    data_range = _number(data_range, "data_range",
                         " (the span of possible pixel values, e.g. 1.0 for images in [0, 1])")
    sigma = _number(sigma, "sigma", " (the Gaussian window's standard deviation, in pixels)")
    k1 = _number(k1, "k1", " (the luminance constant, 0.01 by default)")
    k2 = _number(k2, "k2", " (the contrast constant, 0.03 by default)")
    return data_range, sigma, k1, k2


def _win(win_size) -> int:
    if isinstance(win_size, bool) or not isinstance(win_size, int) or win_size < MIN_WIN_SIZE or win_size % 2 == 0:
        raise InputError(f"win_size must be an odd integer >= {MIN_WIN_SIZE}. Got {win_size!r}.")
    return win_size


def _as_tensor(v, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        try:
            v = torch.as_tensor(v)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"{name} must be a tensor or array of images; it could not be read as one "
                             f"({marked(exc)}).") from None
    if v.is_complex():
        raise InputError(f"{name} must be real-valued; got dtype {v.dtype}.")
    return v


def _images(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Both inputs as float tensors of shape (B, C, H, W) on x's device (float64 unless both are float32 or
    narrower floats, then float32), after the checks every public function shares."""
    x, y = _as_tensor(x, "x"), _as_tensor(y, "y")
    if x.ndim not in (3, 4):
        raise InputError(f"x must hold images of shape (B, C, H, W) or (B, H, W); got shape {tuple(x.shape)}. "
                         "Add a batch axis for a single image.")
    if x.shape != y.shape:
        raise InputError(f"x and y must have the same shape; got {tuple(x.shape)} and {tuple(y.shape)}. "
                         "Pass each image beside its own reconstruction.")
    if x.shape[0] == 0 or x.numel() == 0:
        raise InputError(f"x and y hold no pixels (shape {tuple(x.shape)}); pass at least one image.")
    low = all(t.is_floating_point() and t.dtype != torch.float64 for t in (x, y))
    dtype = torch.float32 if low else torch.float64
    x, y = x.to(dtype), y.to(device=x.device, dtype=dtype)
    for t, name in ((x, "x"), (y, "y")):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise InputError(f"{name} holds {bad} non-finite value(s) (NaN or inf); SSIM is undefined there, "
                             "so clean or drop those images.")
    if x.ndim == 3:
        x, y = x.unsqueeze(1), y.unsqueeze(1)  # (B, 1, H, W)
    return x, y


# ---------------------------------------------------------------------------------------------------------
# kernels (no validation)


def gaussian_window(win_size: int, sigma: float, *, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """The 1-D normalised Gaussian window, shape (win_size,): ``exp(-i^2 / (2 sigma^2))`` for
    ``i = -(win_size // 2) .. win_size // 2``, divided by its sum (the 2-D window is its outer product)."""
    i = torch.arange(win_size, dtype=dtype, device=device) - win_size // 2
    g = torch.exp(-(i ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def _band(n: int, win: torch.Tensor) -> torch.Tensor:
    """The (n - k + 1, n) banded matrix whose row i holds the window at columns i .. i + k - 1."""
    k = win.shape[0]
    rows = n - k + 1
    cols = torch.arange(rows, device=win.device)[:, None] + torch.arange(k, device=win.device)[None]  # (rows, k)
    return torch.zeros(rows, n, dtype=win.dtype, device=win.device).scatter_(1, cols, win.expand(rows, k).contiguous())


def _filter(t: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filtering of ``t`` (..., H, W) at the valid positions: (..., H - k + 1, W - k + 1).

    Two products with banded matrices rather than ``conv2d`` with one input channel: several times faster
    on CPU for the small images here (and in float64); the cost grows as H W (H + W), not H W k.
    """
    h, w = t.shape[-2:]
    return _band(h, win) @ t @ _band(w, win).T


def _terms(x: torch.Tensor, y: torch.Tensor, win: torch.Tensor, c1: float, c2: float) -> SSIMTerms:
    """Mean SSIM and contrast-structure maps of (B, C, H, W) images; the window must fit."""
    mx, my, exx, eyy, exy = _filter(torch.stack([x, y, x * x, y * y, x * y]), win)  # each (B, C, H', W')
    vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my  # population (co)variances under the window
    cs = (2 * cxy + c2) / (vx + vy + c2)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    return SSIMTerms(ssim=(lum * cs).flatten(2).mean(-1), cs=cs.flatten(2).mean(-1))


def _pool(t: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling between scales (an odd last row / column is dropped)."""
    return F.avg_pool2d(t, kernel_size=2)


# ---------------------------------------------------------------------------------------------------------
# public functions


def ssim_terms(x, y, *, data_range: float, win_size: int = DEFAULT_WIN_SIZE, sigma: float = 1.5, k1: float = 0.01,
               k2: float = 0.03) -> SSIMTerms:
    """Single-scale SSIM and contrast-structure means per image and channel (the pieces of MS-SSIM).

    x, y : images of shape (B, C, H, W) or (B, H, W), same shape, finite; data_range : the span of possible
    pixel values. Returns :class:`SSIMTerms` with ``ssim`` and ``cs`` of shape (B, C).
    """
    x, y = _images(x, y)
    data_range, sigma, k1, k2 = _constants(data_range, sigma, k1, k2)
    win_size = _win(win_size)
    h, w = x.shape[-2:]
    if min(h, w) < win_size:
        raise InputError(f"The images are {h}x{w}, smaller than the {win_size}x{win_size} window; pass an odd "
                         f"win_size <= {min(h, w)}, or use ms_ssim, whose rule shrinks the window.")
    win = gaussian_window(win_size, sigma, dtype=x.dtype, device=x.device)
    return _terms(x, y, win, (k1 * data_range) ** 2, (k2 * data_range) ** 2)


def ssim(x, y, *, data_range: float, win_size: int = DEFAULT_WIN_SIZE, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """SSIM per image, shape (B,): the mean of the SSIM map over valid window positions, averaged over
    channels. Equals ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``. Not clamped (it lies in [-1, 1])."""
    return ssim_terms(x, y, data_range=data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2).ssim.mean(1)


def ms_ssim_params(height: int, width: int, *, win_size: int | None = None, weights: Sequence[float] | None = None,
                   sigma: float = 1.5) -> MSSSIMParams:
    """The effective MS-SSIM settings for ``height`` x ``width`` images (the module's small-image rule).

    >>> p = ms_ssim_params(28, 28)
    >>> p.scales, p.win_size, [round(w, 4) for w in p.weights], p.shapes
    (2, 11, [0.1356, 0.8644], ((28, 28), (14, 14)))
    """
    sigma = _number(sigma, "sigma", " (the Gaussian window's standard deviation, in pixels)")
    side = min(int(height), int(width))
    rule = []
    if win_size is None:
        win_size = min(DEFAULT_WIN_SIZE, side if side % 2 else side - 1)
        if win_size < MIN_WIN_SIZE:
            raise InputError(f"The images are {height}x{width}, too small for even one MS-SSIM scale (the smallest "
                             f"window is {MIN_WIN_SIZE}x{MIN_WIN_SIZE}); pass images of at least "
                             f"{MIN_WIN_SIZE}x{MIN_WIN_SIZE} pixels.")
        rule.append("window 11 shrunk to the image" if win_size < DEFAULT_WIN_SIZE else "window 11")
    else:
        win_size = _win(win_size)
        if side < win_size:
            raise InputError(f"The images are {height}x{width}, smaller than the {win_size}x{win_size} window; pass "
                             f"an odd win_size <= {side}, or win_size=None to let the rule shrink it.")
        rule.append("window given")
    fit = 1
    while fit < 64 and (side >> fit) >= win_size:  # scales whose image still holds the window
        fit += 1
    if weights is None:
        m = min(len(STANDARD_WEIGHTS), fit)
        ws = STANDARD_WEIGHTS if m == len(STANDARD_WEIGHTS) else tuple(
            w / sum(STANDARD_WEIGHTS[:m]) for w in STANDARD_WEIGHTS[:m])
        rule.append("standard weights" if m == len(STANDARD_WEIGHTS)
                    else f"first {m} standard weight(s) renormalised to sum to 1")
    else:
        try:
            ws = tuple(float(w) for w in weights)
        except (TypeError, ValueError):
            ws = ()
        if not ws or not all(math.isfinite(w) and w > 0 for w in ws):
            raise InputError(f"weights must be a non-empty list of finite numbers > 0 (one per scale, finest "
                             f"first). Got {weights!r}.")
        if len(ws) > fit:
            raise InputError(f"The images are {height}x{width}: {len(ws)} weights ask for {len(ws)} scales but only "
                             f"{fit} hold a {win_size}x{win_size} window; pass at most {fit} weight(s), or "
                             "weights=None to let the rule pick.")
        m = len(ws)
        rule.append("weights given")
    shapes = tuple((int(height) >> j, int(width) >> j) for j in range(m))
    return MSSSIMParams(scales=m, win_size=win_size, sigma=sigma, weights=ws, shapes=shapes, rule="; ".join(rule))


def ms_ssim(x, y, *, data_range: float, weights: Sequence[float] | None = None, win_size: int | None = None,
            sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
            return_params: bool = False) -> torch.Tensor | MSSSIMResult:
    """MS-SSIM per image, shape (B,), in [0, 1] (Wang, Simoncelli & Bovik 2003; settings: module docstring).

    x, y : images of shape (B, C, H, W) or (B, H, W), same shape, finite; data_range : the span of possible
    pixel values (e.g. 1.0 for images in [0, 1]). ``weights=None`` and ``win_size=None`` apply the
    small-image rule of :func:`ms_ssim_params`. With ``return_params=True`` returns an
    :class:`MSSSIMResult` (the values, the effective settings and the per-scale factors).
    """
    x, y = _images(x, y)
    data_range, sigma, k1, k2 = _constants(data_range, sigma, k1, k2)
    p = ms_ssim_params(x.shape[-2], x.shape[-1], win_size=win_size, weights=weights, sigma=sigma)
    win = gaussian_window(p.win_size, sigma, dtype=x.dtype, device=x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    factors = []
    for j in range(p.scales):
        t = _terms(x, y, win, c1, c2)
        if j < p.scales - 1:
            factors.append(t.cs.clamp_min(0))  # contrast-structure only at the finer scales
            x, y = _pool(x), _pool(y)
        else:
            factors.append(t.ssim.clamp_min(0))  # luminance enters at the coarsest scale only
    per_scale = torch.stack(factors)  # (M, B, C)
    w = torch.tensor(p.weights, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    value = (per_scale ** w).prod(0).mean(1)  # (B,): per channel, then the channel mean
    return MSSSIMResult(value, p, per_scale) if return_params else value


__all__ = ["STANDARD_WEIGHTS", "SSIMTerms", "MSSSIMParams", "MSSSIMResult", "gaussian_window", "ssim_terms", "ssim",
           "ms_ssim_params", "ms_ssim"]
