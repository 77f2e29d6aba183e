"""Ranks through TrainingLoop: four processes, one Redis, one agreed stop.

A stop requested on one rank (here rank 2, at a random step, while rank 1 is
deliberately slower so that a fixed margin would fail) ends every rank after
the same step, with the reason and the requesting rank in every rank's
``TrainEnded``; a rank that dies ends the others ``failed``, naming it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import evsys_async as ev
    from evsys_async.transports import RedisCoordinator

    url, key, out = sys.argv[1], sys.argv[2], sys.argv[3]
    stop_at = int(os.environ.get("STOP_AT", "-1"))
    ready_at = int(os.environ.get("READY_AT", "-1"))
    pause = float(os.environ.get("PAUSE", "0.002"))

    class StopHere(ev.Callback):
        controls_loop = True  # the request is made before the next step starts

        def on_step_end(self, state, step_idx, batch, metrics):
            if step_idx == stop_at:
                state.request_stop(f"asked at step {step_idx}")

    class Ends(ev.Callback):
        def on_envelope(self, state, envelope):
            event = envelope.event
            if type(event).__name__ == "TrainEnded":
                self.ended = event

    def step(state, step_idx):
        if step_idx == ready_at:
            print("READY", flush=True)
        time.sleep(pause)
        return {"loss": 1.0 / (step_idx + 1)}

    coordinator = RedisCoordinator(url, key, heartbeat=0.1, timeout=float(os.environ.get("TIMEOUT", "5")))
    ends = Ends()
    loop = ev.TrainingLoop(step, num_steps=100_000, output_dir=out, run_key=key,
                           callbacks=[StopHere(), ends], coordinator=coordinator)
    a = loop.run_sync()
    print(json.dumps({"rank": loop.rank, "status": a.status, "steps": a.steps_completed,
                      "reason": a.stop_reason, "stop_rank": ends.ended.stop_rank,
                      "event_rank": ends.ended.rank}), flush=True)
    """
)


@pytest.fixture
def run_key(redis_url: str) -> Iterator[str]:
    import redis

    key = f"ranks-{uuid.uuid4().hex[:10]}"
    yield key
    client = redis.Redis.from_url(redis_url)
    for name in client.scan_iter(f"evsys:{key}:*"):
        client.delete(name)
    client.close()


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Every rank process the test started; killed at the end if still running."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _ranks(
    tmp_path: Path,
    url: str,
    key: str,
    env_of: Callable[[int], dict[str, str]],
    spawned: list[subprocess.Popen[str]],
) -> list[subprocess.Popen[str]]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    spawned += [
        subprocess.Popen(
            [sys.executable, str(script), url, key, str(tmp_path / "runs")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "4", **env_of(r)},
        )
        for r in range(4)
    ]
    return spawned


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_four_ranks_stop_after_the_same_step_when_one_asks(
    redis_url: str, run_key: str, tmp_path: Path, spawned: list[subprocess.Popen[str]]
) -> None:
    stop_at = random.randint(5, 60)
    procs = _ranks(
        tmp_path,
        redis_url,
        run_key,
        lambda r: {
            "STOP_AT": str(stop_at) if r == 2 else "-1",
            "PAUSE": "0.01" if r == 1 else "0.002",  # one rank slower: no fixed margin holds
        },
        spawned,
    )
    results = sorted((_result(p) for p in procs), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1, 2, 3]
    steps = {r["steps"] for r in results}
    assert len(steps) == 1, results  # every rank ran the same steps
    assert steps.pop() >= stop_at + 1
    for r in results:
        assert r["status"] == "stopped", r
        assert r["reason"] == f"asked at step {stop_at}"
        assert r["stop_rank"] == 2 and r["event_rank"] == r["rank"]
    manifest = json.loads((tmp_path / "runs" / run_key / "manifest.json").read_text())
    assert manifest["status"] == "stopped"  # rank 0 writes the run's files


def test_a_killed_rank_ends_the_others_failed_naming_it(
    redis_url: str, run_key: str, tmp_path: Path, spawned: list[subprocess.Popen[str]]
) -> None:
    procs = _ranks(
        tmp_path,
        redis_url,
        run_key,
        lambda r: {"READY_AT": "20" if r == 3 else "-1", "TIMEOUT": "1"},
        spawned,
    )
    assert procs[3].stdout is not None
    assert procs[3].stdout.readline().strip() == "READY"
    procs[3].send_signal(signal.SIGKILL)
    procs[3].communicate(timeout=30)
    for r in (_result(p) for p in procs[:3]):
        assert r["status"] == "failed" and r["stop_rank"] == 3, r
        assert "rank 3" in r["reason"]
