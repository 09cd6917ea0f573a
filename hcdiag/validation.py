"""Validation of user data at the public boundary (one place, one set of messages).

Every entry point that takes a data matrix (loaders, spectrum, clusterings, training) calls
:func:`as_data_matrix`, so the same bad input gets the same one-line message everywhere.
"""

from __future__ import annotations

import numpy as np

from hcdiag.errors import InputError

_CHUNK_ROWS = 65536


def _where(rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return f"rows {shown}{', ...' if len(rows) > limit else ''}"


def nonfinite_rows(x) -> np.ndarray:
    """Indices of rows of ``x`` (shape (n, N)) holding NaN or inf, scanned in chunks (memmap-safe)."""
    bad = []
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        block = np.asarray(x[start:start + _CHUNK_ROWS])
        rows = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if rows.size:
            bad.append(rows + start)
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def as_data_matrix(x, *, name: str = "data", drop_nonfinite: bool = False, min_rows: int = 2):
    """Check that ``x`` is a numeric 2-D array of shape (n, N) with finite rows.

    Returns ``(x, dropped)`` where ``dropped`` is the array of row indices removed (empty unless
    ``drop_nonfinite``). Memory-mapped arrays stay memory-mapped when nothing is dropped.
    Torch tensors are accepted and returned as numpy arrays (CPU).

    >>> as_data_matrix([[1.0, 2.0], [3.0, 4.0]])[0].shape
    (2, 2)
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise InputError(f"The {name} must be a numeric 2-D array of shape (n, N); it could not be read as one ({exc}).") from None
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise InputError(f"The {name} must be numeric; got dtype {x.dtype}. Convert it to floats (e.g. a .npy of float32).")
    if np.issubdtype(x.dtype, np.complexfloating):
        raise InputError(f"The {name} must be real-valued; got dtype {x.dtype}.")
    if x.ndim != 2:
        raise InputError(f"The {name} must be a 2-D array of shape (n, N); got {x.ndim}-D with shape {tuple(x.shape)}. "
                         "Reshape it to one row per sample.")
    if x.shape[1] < 1:
        raise InputError(f"The {name} has no columns (shape {tuple(x.shape)}); it needs at least one feature.")
    dropped = np.zeros(0, dtype=np.int64)
    if np.issubdtype(x.dtype, np.floating):
        bad = nonfinite_rows(x)
        if bad.size:
            if not drop_nonfinite:
                raise InputError(f"The {name} holds {bad.size} row(s) with NaN or inf ({_where(bad)}); "
                                 "clean them or pass --drop-nonfinite to drop them.")
            keep = np.ones(x.shape[0], dtype=bool)
            keep[bad] = False
            x = np.asarray(x[keep])
            dropped = bad
    if x.shape[0] < min_rows:
        raise InputError(f"The {name} has {x.shape[0]} row(s); at least {min_rows} are needed for a covariance.")
    return x, dropped
