"""What the built-ins read from users' objects and how they make it fit (``callbacks/_values.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from evsys_async.callbacks._values import (
    benchmark_metrics,
    benchmark_name,
    field_of,
    json_ready,
    table_cell,
)


@dataclass
class EvalResult:
    name: str | None = "squad"
    metrics: dict[str, float] = field(default_factory=lambda: {"f1": 0.5})


class Run(msgspec.Struct):
    arm: str
    out: Path


def test_field_of_reads_a_mapping_or_an_attribute() -> None:
    assert field_of({"a": 1}, "a") == 1 and field_of(EvalResult(), "name") == "squad"
    assert field_of({}, "a") is None and field_of(object(), "a", "x") == "x"


@pytest.mark.parametrize(
    "result", [EvalResult(), {"name": "squad", "metrics": {"f1": 0.5}}], ids=["object", "mapping"]
)
def test_a_benchmark_result_is_read_from_either_shape(result: Any) -> None:
    assert benchmark_name(result) == "squad"
    metrics = benchmark_metrics(result)
    assert metrics == {"f1": 0.5}
    metrics["x"] = 1.0  # a copy: the user's result is left alone
    assert benchmark_metrics(result) == {"f1": 0.5}


def test_a_result_without_name_or_metrics() -> None:
    assert benchmark_name({}) == benchmark_name(EvalResult(name=None)) == "benchmark"
    assert benchmark_metrics(object()) == {}


def test_json_ready_and_table_cell() -> None:
    ready = json_ready({"run": Run(arm="a", out=Path("/x")), "when": EvalResult()})
    assert ready == {
        "run": {"arm": "a", "out": "/x"},
        "when": {"name": "squad", "metrics": {"f1": 0.5}},
    }
    assert [table_cell(v) for v in ("s", 1, 2.5, True, None)] == ["s", 1, 2.5, True, None]
    assert table_cell(Path("/x")) == "/x" and table_cell([1, 2]) == "[1, 2]"
