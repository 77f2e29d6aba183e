"""Ranks through TrainingLoop: who gives the rank and world size, each rank's own files,
and four processes, one Redis, one agreed stop.

A stop requested on one rank (here rank 2, at a random step, while rank 1 is
deliberately slower so that a fixed margin would fail) ends every rank after
the same step, with the reason and the requesting rank in every rank's
``TrainEnded``; a rank that dies ends the others ``failed``, naming it.
"""

from __future__ import annotations

import contextlib
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

    ranks = {}
    if os.environ.get("RANKS_TO_THE_LOOP"):  # given to the loop, as a user writes it
        ranks = {"rank": int(os.environ.pop("RANK")), "world_size": int(os.environ.pop("WORLD_SIZE"))}
    coordinator = RedisCoordinator(url, key, heartbeat=0.1, timeout=float(os.environ.get("TIMEOUT", "5")))
    ends = Ends()
    loop = ev.TrainingLoop(step, num_steps=100_000, output_dir=out, run_key=key,
                           callbacks=[StopHere(), ends], coordinator=coordinator, **ranks)
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
            "RANKS_TO_THE_LOOP": "1",  # the coordinator takes the loop's ranks
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
    run_dir = tmp_path / "runs" / run_key
    for rank in range(4):  # each rank its own manifest: rank 0 the run's, the others inside
        path = (
            run_dir / "manifest.json" if rank == 0 else run_dir / f"rank-{rank}" / "manifest.json"
        )
        manifest = json.loads(path.read_text())
        assert (manifest["rank"], manifest["world_size"], manifest["status"]) == (
            rank,
            4,
            "stopped",
        )


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


# -- rank and world size, given once -------------------------------------------------------

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _redis_coordinator(**ranks: int) -> Any:
    from evsys_async.transports import RedisCoordinator

    return RedisCoordinator("redis://127.0.0.1:1/0", "k", client=object(), **ranks)


async def _step(state: Any, step_idx: int) -> dict[str, float]:
    return {"loss": 1.0}


def test_ranks_given_to_the_loop_reach_a_coordinator_without_its_own(
    no_launcher: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import evsys_async as ev

    c = _redis_coordinator()  # the case: nothing given here, nothing in the env
    loop = ev.TrainingLoop(
        _step, num_steps=1, output_dir=tmp_path, rank=2, world_size=3, coordinator=c
    )
    assert (loop.rank, loop.world_size) == (c.rank, c.world_size) == (2, 3)
    c = _redis_coordinator(rank=1, world_size=4)  # given to the coordinator only
    loop = ev.TrainingLoop(_step, num_steps=1, output_dir=tmp_path, coordinator=c)
    assert (loop.rank, loop.world_size) == (1, 4)
    c = _redis_coordinator(rank=2)  # one to each
    loop = ev.TrainingLoop(_step, num_steps=1, output_dir=tmp_path, world_size=3, coordinator=c)
    assert (loop.rank, loop.world_size) == (c.rank, c.world_size) == (2, 3)
    c = _redis_coordinator(rank=1, world_size=3)  # the same to both: fine
    ev.TrainingLoop(_step, num_steps=1, output_dir=tmp_path, rank=1, world_size=3, coordinator=c)


def test_contradicting_ranks_are_refused_naming_both(
    no_launcher: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import evsys_async as ev

    with pytest.raises(
        ValueError,
        match=r"world_size=3 given to the loop contradicts "
        r"world_size=2 given to the coordinator",
    ):
        ev.TrainingLoop(
            _step,
            num_steps=1,
            output_dir=tmp_path,
            world_size=3,
            coordinator=_redis_coordinator(world_size=2),
        )

    class Own:  # a coordinator without bind_ranks: its ranks are its own
        rank, world_size, pending = 1, 2, False

    with pytest.raises(ValueError, match="rank=0 given to the loop contradicts rank=1"):
        ev.TrainingLoop(_step, num_steps=1, output_dir=tmp_path, rank=0, coordinator=Own())  # type: ignore[arg-type]
    loop = ev.TrainingLoop(_step, num_steps=1, output_dir=tmp_path, coordinator=Own())  # type: ignore[arg-type]
    assert (loop.rank, loop.world_size) == (1, 2)
    with pytest.raises(ValueError, match=r"rank=2, world_size=1"):
        _redis_coordinator(rank=2).start()  # alone, nobody gave a world size: refused


def test_the_environment_fills_only_what_neither_gives(
    no_launcher: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import evsys_async as ev

    no_launcher.setenv("RANK", "3")
    no_launcher.setenv("WORLD_SIZE", "4")
    c = _redis_coordinator()
    assert (c.rank, c.world_size) == (3, 4)  # on its own, the launcher's
    loop = ev.TrainingLoop(_step, num_steps=1, output_dir=tmp_path, rank=1, coordinator=c)
    assert (loop.rank, loop.world_size) == (c.rank, c.world_size) == (1, 4)
    loop = ev.TrainingLoop(_step, num_steps=1, output_dir=tmp_path)
    assert (loop.rank, loop.world_size) == (3, 4)


@pytest.mark.anyio
async def test_each_rank_writes_its_own_files(
    no_launcher: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import anyio

    import evsys_async as ev

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if state.rank == 1 and step_idx == 2:
            raise ValueError("nan on rank 1")
        return {"loss": 1.0}

    loops = [
        ev.TrainingLoop(
            step,
            num_steps=4,
            output_dir=tmp_path,
            run_key="r",
            rank=r,
            world_size=2,
            config={"lr": 0.1},
        )
        for r in (0, 1)
    ]
    started: dict[int, str] = {}
    for r, loop in enumerate(loops):
        loop.subscribe(lambda e, r=r: started.setdefault(r, getattr(e, "output_dir", "")))

    async def run(loop: ev.TrainingLoop) -> None:
        with contextlib.suppress(ValueError):  # rank 1's step fails: its error.txt says so
            await loop.run()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for loop in loops:
                tg.start_soon(run, loop)
    run_dir = tmp_path / "r"
    zero = json.loads((run_dir / "manifest.json").read_text())
    one = json.loads((run_dir / "rank-1" / "manifest.json").read_text())
    assert (zero["rank"], zero["status"], one["rank"], one["status"]) == (
        0,
        "completed",
        1,
        "failed",
    )
    assert "nan on rank 1" in (run_dir / "rank-1" / "error.txt").read_text()
    assert not (run_dir / "error.txt").exists()
    assert (run_dir / "hparams.yaml").exists() and not (
        run_dir / "rank-1" / "hparams.yaml"
    ).exists()
    assert started == {0: str(run_dir), 1: str(run_dir / "rank-1")}
