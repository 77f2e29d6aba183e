"""JSON lines that keep NaN and infinity, the same way everywhere.

JSON has no NaN or Infinity, and msgspec writes them as ``null``, which loses
a diverging loss. Every file evsys-async writes (``events.jsonl``,
``metrics.jsonl``, the experiment store) writes them as the strings
``"nan"``, ``"inf"`` and ``"-inf"`` instead — what ``float()`` reads back
and what ``metrics.csv`` holds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec

from .files import write_atomic

__all__ = ["encode_json", "non_finite_as_strings", "trim_jsonl"]

_encoder = msgspec.json.Encoder(enc_hook=str)


def encode_json(obj: Any) -> bytes:
    """``obj`` as one line of JSON, NaN and +-inf as ``"nan"``/``"inf"``/``"-inf"``."""
    data = _encoder.encode(obj)
    if b"null" in data:  # cheap test first: most lines have no null at all
        fixed = non_finite_as_strings(msgspec.to_builtins(obj, enc_hook=str))
        if fixed is not None:
            data = _encoder.encode(fixed)
    return data


def non_finite_as_strings(value: Any) -> Any:
    """``value`` with non-finite floats as strings, or ``None`` if it has none."""
    changed = False

    def walk(v: Any) -> Any:
        nonlocal changed
        if isinstance(v, float) and not math.isfinite(v):
            changed = True
            return str(v)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [walk(x) for x in v]
        return v

    out = walk(value)
    return out if changed else None


def trim_jsonl(path: Path, start_step: int) -> None:
    """Drop the lines of ``path`` whose ``"step"`` is ``start_step`` or later.

    A resumed run writes those steps again; without this they would appear twice.
    Lines without a step are kept. Rewritten atomically; a missing file is fine.
    """
    if not path.exists():
        return
    kept: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                step = None
            if not isinstance(step, int) or step < start_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept), errors="raise")
