"""Number formatting shared by the built-ins that print (the seed's ``_fmt_value``)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["fmt_value"]


def fmt_value(value: Any) -> str:
    """``.4f``; ``.2e`` for a nonzero magnitude below 1e-3 or from 1e6; non-numbers as str."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    v = float(value)
    if math.isinf(v) or (v != 0.0 and (abs(v) < 1e-3 or abs(v) >= 1e6)):
        return f"{v:.2e}"
    return f"{v:.4f}"
