"""How the built-ins read what users' code hands them, and make it fit a file or a table.

* A benchmark's eval result (``on_benchmark_eval``) is a mapping or any object
  with ``name`` and ``metrics``: :func:`benchmark_name` and
  :func:`benchmark_metrics` read either, :func:`field_of` any other field.
* :func:`json_ready` turns configs, results and rows (dataclasses, Structs,
  paths ...) into JSON-able builtins, anything unknown as its ``str``.
* :func:`table_cell` turns a value into one cell of a table (a W&B table): a
  scalar as it is, anything else as its ``str``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = [
    "DEFAULT_BENCHMARK_NAME",
    "benchmark_metrics",
    "benchmark_name",
    "field_of",
    "json_ready",
    "table_cell",
]

#: the name of an eval result that has none
DEFAULT_BENCHMARK_NAME = "benchmark"


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    """``obj[name]`` for a mapping, else ``obj.name``; ``default`` when missing."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def benchmark_name(eval_result: Any) -> str:
    """The eval result's ``name``, or ``"benchmark"`` when it has none."""
    return str(field_of(eval_result, "name") or DEFAULT_BENCHMARK_NAME)


def benchmark_metrics(eval_result: Any) -> dict[str, Any]:
    """The eval result's ``metrics`` as a new dict (empty when it has none)."""
    return dict(field_of(eval_result, "metrics") or {})


def json_ready(value: Any) -> Any:
    """JSON-able builtins (dataclasses, Structs, paths become dicts and strings)."""
    return msgspec.to_builtins(value, enc_hook=str)


def table_cell(value: Any) -> Any:
    """A scalar (str, int, float, bool, None) as it is; anything else as its ``str``."""
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)
