"""Validation of user data at the public boundary (one place, one set of messages).

Every entry point that takes a data matrix (loaders, spectrum, clusterings, training) calls
:func:`as_data_matrix`, so the same bad input gets the same one-line message everywhere.

The bound on magnitudes: hcdiag computes in float32 (max 3.4e38) wherever the data meets a model,
and sums squares of the data (covariances over rows, squared distances over features). A value
``|x| <= MAX_ABS = 1e15`` keeps a sum of up to 1e8 such squares (1e8 * 1e30 = 1e38) finite in
float32; larger values are refused with a request to rescale, not cast to inf or NaN downstream.
"""

from __future__ import annotations

import os

import numpy as np

from hcdiag.errors import InputError, flag

#: Largest |value| a data matrix may hold (see the module docstring).
MAX_ABS = 1e15
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CHUNK_ELEMENTS = 1 << 22  # elements per scanned block: 32 MiB of float64, memmap-safe


def _where(rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return f"rows {shown}{', ...' if len(rows) > limit else ''}"


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return None


def _row_ranges(x):
    """Per-row max and min of ``x`` (shape (n, N)), scanned in blocks (memmap-safe), as float64.

    NaN propagates through both (numpy's max/min do), so a row with NaN or inf has a non-finite
    max or min; no temporary larger than one block is made.
    """
    n, d = x.shape
    step = max(1, _CHUNK_ELEMENTS // max(1, d))
    hi = np.empty(n, dtype=np.float64)
    lo = np.empty(n, dtype=np.float64)
    for start in range(0, n, step):
        block = np.asarray(x[start:start + step])
        hi[start:start + step] = block.max(axis=1)
        lo[start:start + step] = block.min(axis=1)
    return hi, lo


def nonfinite_rows(x) -> np.ndarray:
    """Indices of rows of ``x`` (shape (n, N)) holding NaN or inf, scanned in chunks (memmap-safe)."""
    if not np.issubdtype(x.dtype, np.inexact) or x.shape[1] == 0:
        return np.zeros(0, dtype=np.int64)
    hi, lo = _row_ranges(x)
    return np.flatnonzero(~(np.isfinite(hi) & np.isfinite(lo)))


def _as_numpy(x, name: str):
    """A torch tensor as a numpy array on the CPU: dtypes numpy lacks (bfloat16, float8) become float32,
    which holds them exactly; complex tensors (complex32 has no numpy dtype) are refused here."""
    import torch

    x = x.detach()
    if x.is_complex():
        raise _complex_error(name, str(x.dtype).replace("torch.", ""))
    if x.is_floating_point() and x.dtype not in (torch.float16, torch.float32, torch.float64):
        x = x.to(torch.float32)
    try:
        return x.cpu().numpy()
    except (TypeError, RuntimeError) as exc:
        raise InputError(f"The {name} is a torch tensor of dtype {str(x.dtype).replace('torch.', '')} that numpy "
                         f"cannot hold ({' '.join(str(exc).split())[:120]}); convert it with x.float() "
                         "(a dense float32 tensor).") from None


def _complex_error(name: str, dtype) -> InputError:
    return InputError(f"The {name} must be real-valued; got dtype {dtype}. Keep the real part (x.real) or store "
                      "the real and imaginary parts as separate columns.")


def as_data_matrix(x, *, name: str = "data", drop_nonfinite: bool = False, min_rows: int = 2):
    """Check that ``x`` is a numeric 2-D array of shape (n, N) with finite rows within ``+-MAX_ABS``.

    Returns ``(x, dropped)`` where ``dropped`` is the array of row indices removed (empty unless
    ``drop_nonfinite``). Memory-mapped arrays stay memory-mapped when nothing is dropped.
    Torch tensors are accepted and returned as numpy arrays (CPU; bfloat16 as float32).
    Values beyond ``MAX_ABS`` are refused even with ``drop_nonfinite``: they are finite here but
    overflow float32 (or their squares do) in every computation downstream.

    >>> as_data_matrix([[1.0, 2.0], [3.0, 4.0]])[0].shape
    (2, 2)
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = _as_numpy(x, name)
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            raise InputError(f"The {name} must be a numeric 2-D array of shape (n, N); it could not be read as one "
                             f"({' '.join(str(exc).split())[:160]}).") from None
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise InputError(f"The {name} must be numeric; got dtype {x.dtype}. Convert it to floats (e.g. a .npy of float32).")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise _complex_error(name, x.dtype)
    if x.ndim != 2:
        raise InputError(f"The {name} must be a 2-D array of shape (n, N); got {x.ndim}-D with shape {tuple(x.shape)}. "
                         "Reshape it to one row per sample.")
    if x.shape[1] < 1:
        raise InputError(f"The {name} has no columns (shape {tuple(x.shape)}); it needs at least one feature.")
    memory = physical_memory()
    if not isinstance(x, np.memmap) and memory is not None and x.size * 4 > memory:
        # only a view can claim this much (e.g. a zero-stride tensor): a float32 copy could not be made
        raise InputError(f"The {name} claims shape {tuple(x.shape)} ({x.size * 4 / 2**30:.3g} GiB as float32), more "
                         f"than this machine's memory ({memory / 2**30:.3g} GiB); store the rows themselves, or fewer.")
    dropped = np.zeros(0, dtype=np.int64)
    if x.dtype != bool and x.shape[0] and (np.issubdtype(x.dtype, np.inexact) or np.iinfo(x.dtype).max > MAX_ABS):
        hi, lo = _row_ranges(x)
        finite = np.isfinite(hi) & np.isfinite(lo)
        bad = np.flatnonzero(~finite)
        if bad.size:
            if not drop_nonfinite:
                raise InputError(f"The {name} holds {bad.size} row(s) with NaN or inf ({_where(bad)}); "
                                 f"clean them or pass {flag('--drop-nonfinite', 'drop_nonfinite=True')} to drop them.")
        big = np.flatnonzero(finite & ((hi > MAX_ABS) | (lo < -MAX_ABS)))
        if big.size:
            largest = float(max(np.abs(hi[big]).max(), np.abs(lo[big]).max()))
            why = ("which overflow float32" if largest > _FLOAT32_MAX else
                   "whose sums of squares (covariances, losses) overflow float32")
            raise InputError(f"The {name} holds {big.size} row(s) with values beyond +-{MAX_ABS:g} ({_where(big)}; "
                             f"largest |x| = {largest:.3g}), {why} (max {_FLOAT32_MAX:.3g}); rescale the data "
                             "(e.g. divide it by its largest |x|, or standardise each column).")
        if bad.size:
            keep = np.ones(x.shape[0], dtype=bool)
            keep[bad] = False
            x = np.asarray(x[keep])
            dropped = bad
    if x.shape[0] < min_rows:
        raise InputError(f"The {name} has {x.shape[0]} row(s); at least {min_rows} are needed for a covariance.")
    return x, dropped
