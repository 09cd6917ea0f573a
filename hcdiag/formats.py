"""Plain output formats shared by the library and the command line: JSON-safe values and aligned text tables.

A leaf module (numpy only, imported lazily), so that reports, verify and the artefacts never import the CLI.

>>> to_jsonable({"a": float("nan"), "b": (1, 2)})
{'a': None, 'b': [1, 2]}
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def to_jsonable(obj: Any) -> Any:
    """Numpy/torch scalars and arrays to plain JSON; non-finite floats to None."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. hcdiag.plan.Counts
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    if np is not None:
        if isinstance(obj, np.ndarray):
            return to_jsonable(obj.tolist())
        if isinstance(obj, np.generic):
            obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if c == 0 or (1e-3 <= abs(c) < 1e5):
            return f"{c:.4g}"
        return f"{c:.3e}"
    return str(c)


def duration(seconds: float) -> str:
    """``seconds`` in the unit that reads best, for progress lines and plans: ``42 s``, ``12 min``, ``3.4 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
