"""LocalStore (``store.py``): the original system's experiment layout, one JSON file per record.

What the module promises: the layout under ``root``; records written
atomically (a reader sees the old record or the new one, never a torn one, and
no temp file stays behind); updates from many threads lose nothing; row files
grow by whole lines, NaN and infinity kept as strings; ids that could escape
the store are made safe or refused with a clear error.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from evsys_async.errors import ConfigError
from evsys_async.store import LocalStore


def test_store_layout_and_atomic_records(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    eid = store.create_experiment("exp one", config={"a": 1})
    assert eid.startswith("exp_one-")
    store.start_run(eid, "arm/a", num_steps=3)
    assert store.append(eid, "arm/a", "metrics", [{"step": 0}, {"step": 1}]) == 2
    store.append(eid, "arm/a", "checkpoints", [{"name": "final", "path": Path("/x")}])
    store.update_run(eid, "arm/a", status="completed")
    store.update_experiment(eid, status="completed")
    run_dir = tmp_path / "store" / "experiments" / eid / "runs" / "arm_a"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    assert store.read_rows(eid, "arm/a", "metrics") == [{"step": 0}, {"step": 1}]
    assert store.read_rows(eid, "arm/a", "checkpoints") == [{"name": "final", "path": "/x"}]
    assert json.loads((tmp_path / "store" / "experiments" / eid / "experiment.json").read_text())[
        "config"
    ] == {"a": 1}
    assert not list((tmp_path / "store").rglob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="create it first"):
        store.update_run(eid, "nope", status="x")
    with pytest.raises(ValueError, match="kind must be one of"):
        store.append(eid, "arm/a", "logs", [{}])  # type: ignore[arg-type]


def test_store_updates_from_many_threads_lose_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    eid = store.create_experiment("e", experiment_id="e1")
    store.start_run(eid, "r")

    def work(i: int) -> None:
        for j in range(20):
            store.update_run(eid, "r", **{f"k{i}_{j}": j})

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record = store.read_run(eid, "r")
    assert record is not None and sum(k.startswith("k") for k in record) == 80


def test_layout_paths(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.experiment_dir("e1") == tmp_path / "experiments" / "e1"
    assert store.run_dir("e1", "arm-a") == tmp_path / "experiments" / "e1" / "runs" / "arm-a"
    assert store.run_dir("e1", "") == tmp_path / "experiments" / "e1" / "runs" / "run"
    assert (
        not store.owned_by_experiment
        and LocalStore(tmp_path, owned_by_experiment=True).owned_by_experiment
    )


@pytest.mark.parametrize("bad", ["../../etc", "/abs/path", "a/../../b", "..\\x"])
def test_ids_never_escape_the_store(tmp_path: Path, bad: str) -> None:
    store = LocalStore(tmp_path / "store")
    eid = store.create_experiment("e", experiment_id=bad)
    store.start_run(eid, bad)
    store.append(eid, bad, "metrics", [{"step": 0}])
    root = (tmp_path / "store").resolve()
    for path in (tmp_path / "store").rglob("*"):
        assert path.resolve().is_relative_to(root), path
    assert store.read_rows(eid, bad, "metrics") == [{"step": 0}]


def test_an_id_with_nothing_usable_is_refused_clearly(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ConfigError, match=r"run key '\.\.\.' has no usable characters"):
        store.start_run("e1", "...")
    with pytest.raises(ConfigError, match="experiment name '//' has no usable characters"):
        store.create_experiment("//")
    assert isinstance(ConfigError("x"), ValueError)


def test_reopening_a_record_keeps_what_it_had(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    eid = store.create_experiment("e", experiment_id="e1", owner="me")
    first = store.read_experiment(eid)
    assert first is not None and first["status"] == "running" and first["id"] == "e1"
    assert store.create_experiment("e", experiment_id="e1", note="again") == "e1"
    again = store.read_experiment(eid)
    assert again is not None
    assert again["created_at"] == first["created_at"] and again["owner"] == "me"
    assert again["note"] == "again" and again["updated_at"] >= first["updated_at"]

    store.start_run(eid, "r", num_steps=3)
    store.update_run(eid, "r", status="completed", steps=3)
    run = store.start_run(eid, "r")  # a resumed run: running again, the rest kept
    assert run["status"] == "running" and run["steps"] == 3 and run["num_steps"] == 3
    assert store.read_run(eid, "r") == run


def test_reading_what_does_not_exist(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.read_experiment("nope") is None
    assert store.read_run("nope", "r") is None
    assert store.read_rows("nope", "r", "metrics") == []
    with pytest.raises(FileNotFoundError, match="create it first"):
        store.update_experiment("nope", status="x")


def test_rows_are_whole_lines_and_keep_non_finite_values(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    assert store.append("e1", "r", "evals", []) == 0
    assert not store.run_dir("e1", "r").exists()  # nothing to write: nothing created
    rows = [{"step": 0, "loss": math.nan}, {"step": 1, "loss": math.inf, "low": -math.inf}]
    assert store.append("e1", "r", "metrics", rows) == 2
    assert store.append("e1", "r", "metrics", [{"step": 2, "loss": 0.5}]) == 1
    text = (store.run_dir("e1", "r") / "metrics.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 3
    parsed = [json.loads(line) for line in text.splitlines()]  # every line whole JSON
    assert parsed[0]["loss"] == "nan" and parsed[1]["loss"] == "inf"
    assert parsed[1]["low"] == "-inf" and parsed[2]["loss"] == 0.5
    assert [float(r["loss"]) for r in store.read_rows("e1", "r", "metrics")][2] == 0.5


def test_a_reader_never_sees_a_torn_record(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    eid = store.create_experiment("e", experiment_id="e1")
    store.start_run(eid, "r")
    path = store.run_dir(eid, "r") / "run.json"
    stop = threading.Event()
    bad: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            text = path.read_text()
            reads += 1
            try:
                json.loads(text)
            except ValueError:
                bad.append(text)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for i in range(200):
            store.update_run(eid, "r", big="x" * (i * 50), i=i)
    finally:
        stop.set()
        thread.join(10)
    assert bad == [] and reads > 0
    record = store.read_run(eid, "r")
    assert record is not None and record["i"] == 199
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.json"]  # no temp left
