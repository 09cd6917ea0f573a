"""The data a diffusion run trains on (issue 14): rows centred, optionally rescaled to a chosen lambda_max (check
D2 rescales lambda_max from 0.1 to 10), and the true mixture when one is known.

``prepare(ds, lambda_max=None)`` returns ``x = scale (x_raw - mean)`` in float32 and a JSON-able ``spec``:
the dataset's name, how to regenerate it (synthetic: ``n``, ``dim``, ``k``, ``spread``, ``separation``, ``seed``),
``center`` (the raw mean, float64), ``scale``, and the lambda_max it was scaled to (None: scale 1). lambda_max is the
top eigenvalue of the (1/n) covariance (:func:`hcdiag.spectrum.spectrum`).

The truth a diffusion check may compare samples with is never read from a run file: :func:`truth` regenerates the
synthetic data from ``spec``, requires the stored rows to equal ``scale (x_raw - center)`` (float32 rounding) and only
then returns the mixture (equal weights, means ``scale (mu_k - center)``, common std ``scale * spread``). Anything
else (digits, a user's array, rows that do not match) has no truth, and the checks that need one say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from hcdiag.errors import InputError

_SYNTHETIC_KEYS = ("n", "dim", "k", "spread", "separation", "seed")


@dataclass(frozen=True)
class DiffusionData:
    x: np.ndarray  # (n, d) float32, centred and scaled
    spec: dict


def lambda_max_of(x) -> float:
    """The top eigenvalue of the (1/n) covariance of the rows ``x``."""
    from hcdiag.spectrum import spectrum

    return float(spectrum(np.asarray(x), top=1, device="cpu").lambda_max)


def prepare(ds, *, lambda_max: float | None = None) -> DiffusionData:
    """Centre the rows of the :class:`hcdiag.data.Dataset` ``ds`` and, when ``lambda_max`` is given, scale them so
    that their covariance's top eigenvalue is ``lambda_max``."""
    raw = np.asarray(ds.x, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[0] < 2 or not np.isfinite(raw).all():
        raise InputError(f"Diffusion training needs a finite (n, d) data matrix with n >= 2; got shape {raw.shape}.")
    center = raw.mean(0)
    lam_raw = lambda_max_of(raw - center)
    if not lam_raw > 0:
        raise InputError(f"The data {ds.name} are constant (lambda_max = 0): a diffusion model has nothing to learn and "
                         "the checks no direction to measure; give data that vary.")
    if lambda_max is not None:
        if not (isinstance(lambda_max, (int, float)) and np.isfinite(lambda_max) and lambda_max > 0):
            raise InputError(f"The target lambda_max must be a finite number > 0. Got {lambda_max!r}.")
        scale = float(np.sqrt(lambda_max / lam_raw))
    else:
        scale = 1.0
    spec = {"name": ds.name, "center": center.tolist(), "scale": scale,
            "lambda_max_target": None if lambda_max is None else float(lambda_max), "lambda_max_raw": lam_raw}
    if ds.name == "synthetic" and ds.preprocessing.get("generator") == "numpy default_rng":
        spec["synthetic"] = {k: ds.preprocessing[k] for k in _SYNTHETIC_KEYS}
    x = (scale * (raw - center)).astype(np.float32)
    return DiffusionData(x, spec)


def truth(x: np.ndarray, spec: dict) -> tuple[dict | None, str | None]:
    """``({"means" (K, d), "spread", "weights" (K,)}, None)`` for rows regenerated and matched (module docstring),
    else ``(None, why)``."""
    syn = spec.get("synthetic") if isinstance(spec, dict) else None
    if not isinstance(syn, dict):
        return None, f"the data ({spec.get('name') if isinstance(spec, dict) else '?'}) have no known true distribution"
    from hcdiag.data import synthetic

    x = np.asarray(x)
    try:
        if [syn["n"], syn["dim"]] != list(x.shape):  # before regenerating: a hostile spec could ask for any size
            return None, (f"the run file's data.spec names synthetic data of {syn['n']} x {syn['dim']}, its rows are "
                          f"{x.shape[0]} x {x.shape[1]}, so no true mixture is assumed")
        center = np.asarray(spec["center"], dtype=np.float64)
        scale = float(spec["scale"])
        if center.shape != (x.shape[1],) or not (np.isfinite(center).all() and math.isfinite(scale) and scale > 0):
            return None, "the run file's data.spec has no usable centre and scale, so no true mixture is assumed"
        ds = synthetic(**{k: syn[k] for k in _SYNTHETIC_KEYS})
    except (KeyError, TypeError, ValueError, InputError) as exc:
        return None, f"the synthetic data cannot be regenerated from the run file's data.spec ({str(exc)})"
    want = (scale * (ds.x.astype(np.float64) - center)).astype(np.float32)
    if want.shape != x.shape or not np.allclose(want, x, rtol=1e-5, atol=1e-6 * max(scale, 1e-12)):
        return None, ("the run file's rows are not the synthetic data its data.spec names (regenerated and compared), "
                      "so no true mixture is assumed")
    k = ds.means.shape[0]
    return {"means": scale * (ds.means - center), "spread": scale * float(syn["spread"]),
            "weights": np.full(k, 1.0 / k)}, None


__all__ = ["DiffusionData", "lambda_max_of", "prepare", "truth"]
