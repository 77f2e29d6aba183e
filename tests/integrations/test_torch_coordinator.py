"""``TorchDistributedCoordinator`` (``transports/torch_coordinator.py``) over real gloo.

Four ranks, each a spawned process on loopback with its own session: one rank asks to
stop and one is deliberately slower, so a fixed margin would fail; every rank must
stop after the same step, the largest one reported. A rank whose process dies is
noticed by the others, which end ``failed``. The same stop through ``TrainingLoop``.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.integrations.helpers import INSTALL

torch = pytest.importorskip("torch", reason=f"needs torch: {INSTALL}")

from tests.integrations.ranks import STEPS, rank_main  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WORLD = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(tmp_path: Path, scenario: str, world: int = WORLD) -> tuple[list[Any], list[int]]:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=rank_main, args=(r, world, port, str(tmp_path), scenario))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    results = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return results, [c if c is not None else -1 for c in codes]


def test_every_rank_stops_after_the_same_step(tmp_path: Path) -> None:
    results, codes = run_ranks(tmp_path, "stop")
    assert codes == [0] * WORLD, results
    assert [r["rank"] for r in results] == list(range(WORLD))
    assert {r["world_size"] for r in results} == {WORLD}
    (last,) = {r["steps"][-1] for r in results}  # one step for all
    assert last >= 5  # rank 1 asked after its step 5; the slow rank 2 may be behind it
    assert {r["decision"] for r in results} == {last}
    assert all(r["steps"] == list(range(last + 1)) for r in results)
    assert {(r["status"], r["reason"], r["stop_rank"]) for r in results} == {
        ("stopped", "stop at 5", 1)
    }
    data = json.loads((tmp_path / "job" / "manifest.json").read_text())  # rank 0's
    assert (data["status"], data["steps_completed"]) == ("stopped", last + 1)


def test_a_rank_that_dies_is_noticed_by_the_others(tmp_path: Path) -> None:
    results, codes = run_ranks(tmp_path, "die")
    assert codes[3] == 7 and results[3] is None
    for r in results[:3]:
        assert r["status"] == "failed", results
        assert "lost contact with the other ranks" in r["reason"]
        assert r["steps"][-1] < STEPS["die"] - 1  # it did not run on to the end
    assert codes[:3] == [0, 0, 0]


def test_the_loop_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    results, codes = run_ranks(tmp_path, "loop", world=3)
    assert codes == [0, 0, 0], results
    (last,) = {r["steps"][-1] for r in results}
    assert last >= 5
    assert {(r["status"], r["reason"]) for r in results} == {("stopped", "stop at 5")}
