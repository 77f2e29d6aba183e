"""Metric values as plain floats: converted once per step by the loop (a tensor
syncs there, once), so every subscriber gets the same plain numbers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..events._frozen import FrozenDict
from ..state import StepOutput

__all__ = ["floats", "metrics_of"]


def floats(values: Any, what: str) -> dict[str, float]:
    """``values`` as a read-only ``{str: float}`` (a tensor syncs here, once), ready to
    go into an event without another copy; a clear error otherwise."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{what} must return a mapping of metric name to number, got {values!r}")
    out: dict[str, float] = {}
    for key, value in values.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"{what} returned metric {key!r} = {value!r}, which is not a number; "
                "return floats (or 0-d tensors)"
            ) from None
    return FrozenDict(out)


def metrics_of(out: Any, step_idx: int) -> tuple[dict[str, float], Any]:
    """A step's return value as (metrics, batch)."""
    what = f"step {step_idx}"
    if isinstance(out, StepOutput):
        return floats(out.metrics, what), out.batch
    if out is None:
        return {}, None
    return floats(out, what), None
