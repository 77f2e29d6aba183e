"""JSON lines that keep NaN and infinity, the same way everywhere.

JSON has no NaN or Infinity, and msgspec writes them as ``null``, which loses
a diverging loss. Every file evsys-async writes (``events.jsonl``,
``metrics.jsonl``, the experiment store) writes them as the strings
``"nan"``, ``"inf"`` and ``"-inf"`` instead — what ``float()`` reads back
and what ``metrics.csv`` holds.

JSON that comes from elsewhere (an event log, a stream entry, an HTTP reply)
is checked for nesting deeper than :data:`MAX_DEPTH` before it is decoded
(:func:`too_deep`): msgspec recurses once per level and has no limit of its
own beyond the interpreter's recursion limit, so a 10,000-deep ``[[[...``
would be a bare ``RecursionError`` (or, on a thread with a small stack, a
crash) instead of an error naming the place (docs/replay.md, "Limits").
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import msgspec

from .files import write_atomic

__all__ = [
    "MAX_DEPTH",
    "encode_json",
    "lines_may_nest_deeper",
    "non_finite_as_strings",
    "too_deep",
    "trim_jsonl",
]

#: how deeply a JSON value read from elsewhere may nest (arrays and objects; an event
#: envelope itself uses three levels); deeper is refused before decoding
MAX_DEPTH = 128

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
    Lines without a step are kept, and so is a checkpoint row whose
    ``"resume_step"`` is at most ``start_step`` (an ``interrupted`` checkpoint
    is saved during the step that failed: it holds only the steps before it,
    and is what a resume at that step starts from). Rewritten atomically; a
    missing file is fine.
    """
    if not path.exists():
        return
    kept: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                step, resume = row.get("step"), row.get("resume_step")
            except (ValueError, AttributeError):
                step = resume = None
            holds_only_earlier = isinstance(resume, int) and resume <= start_step
            if not isinstance(step, int) or step < start_step or holds_only_earlier:
                kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept), errors="raise")


# -- nesting depth, checked before decoding ----------------------------------------------

#: every byte but the openers and the newline: ``bytes.translate`` deletes them
_NOT_OPENERS = bytes(b for b in range(256) if b not in b"[{\n")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(rb"[\[\]{}]")


def lines_may_nest_deeper(block: bytes, limit: int = MAX_DEPTH) -> bool:
    """Could a line of ``block`` nest deeper than ``limit``? ``False`` means none can.

    Cheap (two C-speed passes over the bytes): a line's count of ``[`` and ``{``
    bounds its depth from above, and ordinary lines hold a handful. ``True``
    says only that some line needs :func:`too_deep`'s exact check.
    """
    return max(map(len, block.translate(None, _NOT_OPENERS).split(b"\n"))) > limit


def too_deep(data: bytes | str, limit: int = MAX_DEPTH) -> bool:
    """Does the JSON text ``data`` nest arrays and objects deeper than ``limit``?

    Brackets inside strings do not count. Cheap for ordinary text (a count of
    openers first); exact, in one pass over the brackets, for the rare text
    with more than ``limit`` of them. Malformed text is measured as far as it
    goes (an unterminated ``[[[`` is as deep as its openers).
    """
    raw = data.encode() if isinstance(data, str) else data
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth = 0
    for bracket in _BRACKETS.findall(_STRING.sub(b"", raw)):
        if bracket in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False
