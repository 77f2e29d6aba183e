"""RedisCoordinator: ranks (threads, and processes) that stop after the same step, agreed
through the real Redis; a rank that dies or fails ends the others ``failed``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from evsys_async.coordinator import (
    Coordinator,
    CoordinatorError,
    StopDecision,
    StopRequest,
    launch_env,
)
from evsys_async.transports import RedisCoordinator
from evsys_async.transports.redis import control_stream


@pytest.fixture
def run_key(redis_url: str) -> Iterator[str]:
    import redis

    key = f"test-{uuid.uuid4().hex[:12]}"
    yield key
    client = redis.Redis.from_url(redis_url)
    client.delete(control_stream(key))
    client.close()


def ranks_loop(
    coordinator: RedisCoordinator,
    num_steps: int,
    step: Callable[[int], StopRequest | None],
) -> dict[str, Any]:
    """What the loop does at each boundary (docs/distributed.md), as a plain loop."""
    coordinator.start()
    result: dict[str, Any] = {"rank": coordinator.rank, "status": "completed"}
    last = -1
    for i in range(num_steps):
        request = step(i)
        last = i
        decision = coordinator.at_boundary(i, request)
        if decision is not None and i >= decision.step:
            result.update(status=decision.status, decision=decision)
            break
    result["last_step"] = last
    coordinator.finish(result["status"], last + 1)
    return result


def run_threads(targets: list[Callable[[], dict[str, Any]]]) -> list[dict[str, Any]]:
    results: list[dict[str, Any] | BaseException] = [RuntimeError("did not end")] * len(targets)

    def run(i: int) -> None:
        try:
            results[i] = targets[i]()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def test_four_ranks_as_threads_stop_after_the_largest_reported_step(
    redis_url: str, run_key: str
) -> None:
    """Rank 2 is the slow one and asks to stop at its step 10, when the others are past
    step 30: a fixed margin after the requested step would stop them in the past."""
    fast_ahead = threading.Event()
    coordinators = [
        RedisCoordinator(redis_url, run_key, rank=r, world_size=4, heartbeat=0.2, timeout=5)
        for r in range(4)
    ]

    def fast(rank: int) -> Callable[[], dict[str, Any]]:
        def step(i: int) -> None:
            time.sleep(0.001)  # a step's work
            if rank == 0 and i == 30:
                fast_ahead.set()

        return lambda: ranks_loop(coordinators[rank], 100_000, step)

    def slow_step(i: int) -> StopRequest | None:
        time.sleep(0.004)
        if i == 10:
            assert fast_ahead.wait(30)
            return StopRequest("loss is nan on rank 2")
        return None

    results = run_threads(
        [fast(0), fast(1), lambda: ranks_loop(coordinators[2], 100_000, slow_step), fast(3)]
    )
    decisions = {r["decision"] for r in results}
    assert len(decisions) == 1  # the same decision on every rank
    (decision,) = decisions
    assert decision == StopDecision(
        step=decision.step, rank=2, reason="loss is nan on rank 2", failed=False
    )
    assert [r["last_step"] for r in results] == [decision.step] * 4
    reports = coordinators[2].reports
    assert decision.step == max(reports.values()) and reports[2] == 10
    assert decision.step >= 30 > 10 + 5  # the others were ahead: no fixed margin fits
    assert {r["status"] for r in results} == {"stopped"}


def test_boundaries_without_a_stop_do_no_io(redis_url: str, run_key: str) -> None:
    import redis

    coordinators = [
        RedisCoordinator(redis_url, run_key, rank=r, world_size=2, heartbeat=30, timeout=60)
        for r in range(2)
    ]
    results = run_threads([lambda c=c: ranks_loop(c, 5000, lambda i: None) for c in coordinators])
    assert [r["status"] for r in results] == ["completed", "completed"]
    client = redis.Redis.from_url(redis_url)
    kinds = [f[b"kind"] for _, f in client.xrange(control_stream(run_key))]
    client.close()
    # 10,000 boundaries: only the joins, a heartbeat greeting a join, and the leaves
    assert kinds.count(b"join") == 2 and kinds.count(b"leave") == 2
    assert set(kinds) <= {b"join", b"hb", b"leave"} and len(kinds) <= 6


def test_a_rank_that_ends_failed_ends_the_others_failed(redis_url: str, run_key: str) -> None:
    coordinators = [
        RedisCoordinator(redis_url, run_key, rank=r, world_size=3, heartbeat=0.2, timeout=5)
        for r in range(3)
    ]

    def failing() -> dict[str, Any]:
        c = coordinators[1]
        c.start()
        for i in range(5):
            c.at_boundary(i)
        c.finish("failed", 5, error="RuntimeError: CUDA out of memory")
        return {"rank": 1}

    def running(rank: int) -> Callable[[], dict[str, Any]]:
        return lambda: ranks_loop(coordinators[rank], 100_000, lambda i: time.sleep(0.001))

    results = run_threads([running(0), failing, running(2)])
    for r in (results[0], results[2]):
        assert r["status"] == "failed"
        assert r["decision"].rank == 1
        assert r["decision"].reason == "rank 1 ended failed: RuntimeError: CUDA out of memory"


def test_a_rank_that_never_joins_is_named(redis_url: str, run_key: str) -> None:
    c = RedisCoordinator(
        redis_url, run_key, rank=0, world_size=3, heartbeat=0.05, timeout=1, join_timeout=0.3
    )
    with pytest.raises(CoordinatorError, match=r"rank 0: rank\(s\) 1, 2 of 3 did not join run"):
        c.start()


def test_two_processes_claiming_one_rank_are_refused(redis_url: str, run_key: str) -> None:
    def make() -> RedisCoordinator:
        return RedisCoordinator(redis_url, run_key, rank=0, world_size=2, heartbeat=0.05, timeout=2)

    first, second = make(), make()
    errors: list[BaseException] = []

    def start(c: RedisCoordinator) -> None:
        try:
            c.start()
        except CoordinatorError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(c,)) for c in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors and all("two processes claim rank 0" in str(e) for e in errors)
    first.close()
    second.close()


@pytest.mark.anyio
async def test_at_boundary_async_waits_without_blocking_the_event_loop(
    redis_url: str, run_key: str
) -> None:
    other = RedisCoordinator(redis_url, run_key, rank=1, world_size=2, heartbeat=0.1, timeout=5)
    mine = RedisCoordinator(redis_url, run_key, rank=0, world_size=2, heartbeat=0.1, timeout=5)
    ticks = 0
    release = threading.Event()

    def rank1() -> dict[str, Any]:
        def step(i: int) -> None:
            if i == 0:  # before its first boundary, whatever the machine's load
                release.wait(30)  # rank 1 is busy while rank 0 waits for it

        return ranks_loop(other, 1000, step)

    thread = threading.Thread(target=rank1, daemon=True)
    thread.start()
    await anyio.to_thread.run_sync(mine.start)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    if ticks == 5:
                        release.set()  # the loop kept running while rank 0 waited
                    await anyio.sleep(0.01)

            tg.start_soon(ticker)
            decision = await mine.at_boundary_async(0, StopRequest("enough"))
            tg.cancel_scope.cancel()
    thread.join(30)
    mine.finish("stopped", 1)
    assert decision is not None and decision.rank == 0 and decision.step >= 0
    assert ticks >= 5  # the decision needed rank 1, which waited for the fifth tick


def test_the_redis_coordinator_is_a_coordinator() -> None:
    c = RedisCoordinator("redis://127.0.0.1:6379/0", "x", rank=0, world_size=1)
    assert isinstance(c, Coordinator)
    c.close()


def test_launch_env_reads_what_launchers_set() -> None:
    assert launch_env({}) == (0, 1)
    assert launch_env({"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert launch_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "4"}) == (1, 4)
    both = {"RANK": "2", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert launch_env(both) == (2, 4)  # torchrun's inside an allocation wins
    with pytest.raises(ValueError, match=r"\$WORLD_SIZE='four' is not a whole number >= 1"):
        launch_env({"RANK": "0", "WORLD_SIZE": "four"})
    with pytest.raises(ValueError, match=r"\$RANK=4 is not below \$WORLD_SIZE=4"):
        launch_env({"RANK": "4", "WORLD_SIZE": "4"})


# -- ranks as processes -------------------------------------------------------------------

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from evsys_async.coordinator import StopRequest
    from evsys_async.transports import RedisCoordinator

    url, key = sys.argv[1], sys.argv[2]
    stop_at = int(os.environ.get("STOP_AT", "-1"))
    ready_at = int(os.environ.get("READY_AT", "-1"))
    pause = float(os.environ.get("PAUSE", "0.002"))
    c = RedisCoordinator(url, key, heartbeat=0.1, timeout=float(os.environ.get("TIMEOUT", "5")))
    c.start()  # rank and world size: RANK and WORLD_SIZE, as torchrun sets them
    status, last, decision = "completed", -1, None
    for i in range(100_000):
        time.sleep(pause)
        last = i
        if i == ready_at:
            print("READY", flush=True)
        request = StopRequest(f"requested at step {i}") if i == stop_at else None
        d = c.at_boundary(i, request)
        if d is not None and i >= d.step:
            status, decision = d.status, d
            break
    c.finish(status, last + 1)
    print(json.dumps({"rank": c.rank, "status": status, "last_step": last,
                      "stop_rank": decision.rank if decision else None,
                      "reason": decision.reason if decision else None,
                      "reports": c.reports}), flush=True)
    """
)


def _rank_processes(
    tmp_path: Path, url: str, run_key: str, env_of: Callable[[int], dict[str, str]]
) -> list[subprocess.Popen[str]]:
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    return [
        subprocess.Popen(
            [sys.executable, str(script), url, run_key],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "RANK": str(r), "WORLD_SIZE": "4", **env_of(r)},
        )
        for r in range(4)
    ]


def _result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_four_ranks_in_four_processes_stop_at_the_same_step(
    redis_url: str, run_key: str, tmp_path: Path
) -> None:
    stop_at = random.randint(5, 60)
    procs = _rank_processes(
        tmp_path,
        redis_url,
        run_key,
        lambda r: {
            "STOP_AT": str(stop_at) if r == 2 else "-1",
            "PAUSE": "0.01" if r == 1 else "0.002",
        },
    )
    results = [_result(p) for p in procs]
    last = {r["last_step"] for r in results}
    assert len(last) == 1, results
    (agreed,) = last
    assert agreed >= stop_at
    assert agreed == max(results[0]["reports"].values())
    for r in results:
        assert r["status"] == "stopped" and r["stop_rank"] == 2
        assert r["reason"] == f"requested at step {stop_at}"


def test_a_killed_rank_ends_the_others_failed_naming_it(
    redis_url: str, run_key: str, tmp_path: Path
) -> None:
    procs = _rank_processes(
        tmp_path,
        redis_url,
        run_key,
        lambda r: {"READY_AT": "20" if r == 3 else "-1", "TIMEOUT": "1"},
    )
    assert procs[3].stdout is not None
    assert procs[3].stdout.readline().strip() == "READY"
    procs[3].send_signal(signal.SIGKILL)
    procs[3].wait(30)
    procs[3].stdout.close()
    survivors = [_result(p) for p in procs[:3]]
    for r in survivors:
        assert r["status"] == "failed" and r["stop_rank"] == 3
        assert r["reason"].startswith("rank 3 stopped sending heartbeats")


def test_two_ranks_asking_at_once_agree_on_one_decision(redis_url: str, run_key: str) -> None:
    coordinators = [
        RedisCoordinator(redis_url, run_key, rank=r, world_size=2, heartbeat=0.2, timeout=5)
        for r in range(2)
    ]

    def asking(rank: int) -> Callable[[], dict[str, Any]]:
        def step(i: int) -> StopRequest | None:
            return StopRequest(f"rank {rank} had enough", failed=rank == 1) if i == 3 else None

        return lambda: ranks_loop(coordinators[rank], 1000, step)

    assert not coordinators[0].pending  # nothing proposed: boundaries have no work
    results = run_threads([asking(0), asking(1)])
    assert all(c.pending for c in coordinators)
    decisions = {r["decision"] for r in results}
    assert len(decisions) == 1
    (decision,) = decisions
    assert decision.reason == f"rank {decision.rank} had enough"  # the first proposal's
    assert decision.failed == (decision.rank == 1) and decision.step == 3
    assert {r["last_step"] for r in results} == {3}
