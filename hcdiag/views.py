"""Views: what the teacher of the teacher-guided VAE sees of a row (companion notes, seed 000; issue 13, W4).

The notes' teacher targets may be computed from a different view of x than the one the encoder reads. A view
here is a map from the rows the VAE sees to rows of the same shape, deterministic or random:

* ``identity``: the row itself.
* ``noise:<sigma>``: the row plus Gaussian noise of standard deviation ``sigma`` (in the data's units).
* ``shift:<p>``: images only: the image translated by a random integer offset in ``-p..p`` on each axis, the
  border repeating the edge pixels (a crop-and-pad augmentation).
* ``pool:<k>``: images only: each k x k block replaced by its mean (the pooled image, at full size).

``identity`` and ``pool`` are deterministic: the teacher's view is a function of what the encoder sees, so a
student can in principle reproduce the teacher exactly and the view gap is 0. The random views are sampled
``samples`` times per row; the view gap (:func:`hcdiag.checks.witness.view_gap`) is the Jensen gap of the
teacher across those samples, the least alignment any student that reads only x can reach on them.

>>> v = parse_view("noise:0.5"); (v.kind, v.param, v.deterministic)
('noise', 0.5, False)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hcdiag.errors import InputError

KINDS = ("identity", "noise", "shift", "pool")


@dataclass(frozen=True)
class View:
    kind: str
    param: float = 0.0

    @property
    def deterministic(self) -> bool:
        return self.kind in ("identity", "pool")

    @property
    def spec(self) -> str:
        return "identity" if self.kind == "identity" else f"{self.kind}:{self.param:g}"

    def apply(self, x: np.ndarray, rng: np.random.Generator, image_shape=None) -> np.ndarray:
        """One sample of the view of each row of ``x`` (m, N), float64; ``image_shape`` (H, W) or (C, H, W)
        for the image views."""
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "identity":
            return x.copy()
        if self.kind == "noise":
            return x + self.param * rng.standard_normal(x.shape)
        img = _images(x, image_shape, self.spec)
        parse_view(self.spec, img.shape[-2:])  # the image views' limits against this image's sides
        if self.kind == "pool":
            k = int(self.param)
            h, w = img.shape[-2:]
            blocks = img.reshape(img.shape[:-2] + (h // k, k, w // k, k)).mean(axis=(-3, -1))
            return np.repeat(np.repeat(blocks, k, axis=-2), k, axis=-1).reshape(x.shape)
        p = int(self.param)
        offs = rng.integers(-p, p + 1, size=(x.shape[0], 2))
        padded = np.pad(img, [(0, 0)] * (img.ndim - 2) + [(p, p), (p, p)], mode="edge")
        h, w = img.shape[-2:]
        out = np.empty_like(img)
        for dy in range(-p, p + 1):
            for dx in range(-p, p + 1):
                rows = np.nonzero((offs[:, 0] == dy) & (offs[:, 1] == dx))[0]
                if rows.size:
                    out[rows] = padded[rows, ..., p + dy:p + dy + h, p + dx:p + dx + w]
        return out.reshape(x.shape)

    def samples(self, x: np.ndarray, n: int, seed: int, image_shape=None) -> list[np.ndarray]:
        """``n`` independent samples of the view of ``x`` (one for a deterministic view), from ``seed``."""
        rng = np.random.default_rng(seed)
        return [self.apply(x, rng, image_shape) for _ in range(1 if self.deterministic else n)]


def _images(x: np.ndarray, image_shape, spec: str) -> np.ndarray:
    if image_shape is None:
        raise InputError(f"The view {spec!r} needs images and this data has no image shape (synthetic or user "
                         "arrays): use identity or noise:<sigma>.")
    shape = tuple(int(s) for s in image_shape)
    if int(np.prod(shape)) != x.shape[1]:
        raise InputError(f"The view {spec!r}: the rows have {x.shape[1]} values, not an image of shape {shape}.")
    return x.reshape((x.shape[0],) + shape)


def parse_view(spec, image_shape=None) -> View:
    """The view named by ``spec`` (``identity``, ``noise:<sigma>``, ``shift:<p>``, ``pool:<k>``); with
    ``image_shape`` (H, W) the image views are checked against it."""
    if isinstance(spec, View):
        return spec
    s = str(spec).strip()
    kind, _, arg = s.partition(":")
    usage = "choose identity, noise:<sigma> (sigma > 0), shift:<pixels> (integer >= 1) or pool:<k> (integer >= 2)"
    if kind not in KINDS or (kind == "identity") != (arg == ""):
        raise InputError(f"The 'teacher_view' parameter: unknown view {s!r}; {usage}.")
    if kind == "identity":
        return View("identity")
    try:
        value = float(arg)
    except ValueError:
        raise InputError(f"The 'teacher_view' parameter: {s!r} has no number after the colon; {usage}.") from None
    if not np.isfinite(value):
        raise InputError(f"The 'teacher_view' parameter: {s!r} needs a finite number; {usage}.")
    if kind == "noise" and not (np.isfinite(value) and value > 0):
        raise InputError(f"The 'teacher_view' parameter: {s!r} needs sigma > 0; {usage}.")
    if kind in ("shift", "pool") and (value != int(value) or value < (1 if kind == "shift" else 2)):
        raise InputError(f"The 'teacher_view' parameter: {s!r} needs an integer >= {1 if kind == 'shift' else 2}; "
                         f"{usage}.")
    view = View(kind, value)
    if image_shape is not None and kind == "shift":
        h, w = (int(v) for v in tuple(image_shape)[-2:])
        if int(value) >= min(h, w):
            raise InputError(f"The 'teacher_view' parameter: {s!r} shifts by at least the image side ({h} x {w}); "
                             "choose fewer pixels.")
    if image_shape is not None and kind == "pool":
        h, w = (int(v) for v in tuple(image_shape)[-2:])
        if h % int(value) or w % int(value):
            raise InputError(f"The 'teacher_view' parameter: {s!r} needs the image sides ({h} x {w}) to be multiples "
                             f"of {int(value)}.")
    return view


__all__ = ["KINDS", "View", "parse_view"]
