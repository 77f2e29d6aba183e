"""What the bridges share: a trainer's logged values and hyperparameters, made plain.

A trainer logs numbers, tensors of one element and, at times, other things (a
string, a tensor of many); hyperparameters hold anything. The session takes the
numbers (it converts them to floats) and a config of plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["plain", "scalar", "scalars"]


def scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are one number: ints, floats and one-element
    tensors, left as they are (the session converts them); the rest is left out."""
    return {str(key): value for key, value in values.items() if scalar(value)}


def scalar(value: Any) -> bool:
    """``value`` is one number: an int, a float or a one-element tensor."""
    cls = value.__class__
    if cls is float or cls is int:  # what a trainer's logs hold most (the HF Trainer's)
        return True
    numel = getattr(value, "numel", None)
    if callable(numel):
        return bool(numel() == 1)
    return isinstance(value, int | float) and not isinstance(value, bool)


def plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with plain values (str, numbers, bools, ``None``) kept and every other
    value as its ``repr``: what a run's config may carry into events and files."""
    kinds = (str, int, float, bool, type(None))
    return {str(k): v if isinstance(v, kinds) else repr(v) for k, v in config.items()}
