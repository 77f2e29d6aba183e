"""Transports against the real thing: JSON-lines files and a real Redis on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import evsys_async as ev
from evsys_async.errors import EventDecodeError
from evsys_async.events import StepEnded, TrainEnded
from evsys_async.transports import (
    JsonlSink,
    RedisStreamSink,
    RedisStreamSource,
    attach,
    read_jsonl,
)

pytestmark = pytest.mark.anyio

WAIT = 30.0  # the fail_after around every wait: generous, never reached when all is well


class Remote(ev.Event):
    """A user event type that crosses the wire."""

    payload: dict[str, int]


@pytest.fixture
def stream(redis_url: str) -> Iterator[str]:
    import redis

    client = redis.Redis.from_url(redis_url)
    name = f"evsys-test:{uuid.uuid4().hex}"
    yield name
    client.delete(name)
    client.close()


async def test_jsonl_sink_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "log" / "events.jsonl"
    with anyio.fail_after(WAIT):
        async with ev.EventBus() as bus:
            attach(bus, JsonlSink(path))
            for i in range(50):
                bus.publish(StepEnded(step=i, num_steps=50, metrics={"loss": 1 / (i + 1)}))
            bus.publish(Remote(payload={"a": 1}))
    envelopes = list(read_jsonl(path))
    assert [e.seq for e in envelopes] == list(range(51))
    assert {e.bus_id for e in envelopes} == {bus.bus_id}
    assert [e.event.step for e in envelopes[:50]] == list(range(50))  # type: ignore[attr-defined]
    assert envelopes[-1].event == Remote(payload={"a": 1}, ts=envelopes[-1].event.ts)


def test_read_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = ev.events.encode(ev.Envelope("b", 0, StepEnded(step=0, num_steps=1))).decode()
    bad = good.replace('"step":0', '"step":"zero"')
    path.write_text(good + "\n\n" + bad + "\n")
    with pytest.raises(EventDecodeError, match=r"events\.jsonl:3: .*Expected `int`, got `str`"):
        list(read_jsonl(path))


async def test_redis_stream_carries_every_event_in_order(stream: str, redis_url: str) -> None:
    n = 300
    async with ev.EventBus() as sender:
        sub = attach(sender, RedisStreamSink(redis_url, stream=stream))
        for i in range(n):
            sender.publish(StepEnded(step=i, num_steps=n, metrics={"loss": float(i)}))
        sender.publish(Remote(payload={"x": 7}))
        with anyio.fail_after(20):
            assert (await sender.drain(20)).ok
        assert sender.stats()[sub.name].failed == 0

    got: list[ev.Event] = []
    async with ev.EventBus() as receiver:

        async def collect(event: ev.Event) -> None:
            got.append(event)

        receiver.subscribe(collect)
        source = RedisStreamSource(redis_url, stream=stream, start="0-0")
        with anyio.fail_after(20):
            count = await source.forward(receiver, until=lambda e: isinstance(e, Remote))
        source.close()
    assert count == n + 1
    assert [e.step for e in got[:n]] == list(range(n))  # type: ignore[attr-defined]
    assert got[-1] == Remote(payload={"x": 7}, ts=got[-1].ts)


async def test_redis_across_processes(stream: str, redis_url: str, tmp_path: Path) -> None:
    """A training run in another process; this process subscribes through Redis."""
    script = tmp_path / "producer.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import anyio, evsys_async as ev
            from evsys_async.transports import RedisStreamSink, attach

            async def step(state, i):
                return {{"loss": 1.0 / (i + 1)}}

            async def main():
                async with ev.EventBus() as bus:
                    attach(bus, RedisStreamSink({redis_url!r}, stream={stream!r}))
                    loop = ev.TrainingLoop(step, num_steps=40, output_dir={str(tmp_path)!r}, bus=bus)
                    await loop.run()

            anyio.run(main)
            """
        )
    )
    got: list[ev.Event] = []
    async with ev.EventBus() as bus:

        async def collect(event: ev.Event) -> None:
            got.append(event)

        bus.subscribe(collect, events=(StepEnded, TrainEnded))
        source = RedisStreamSource(redis_url, stream=stream, start="0-0")
        proc = await anyio.open_process([sys.executable, str(script)])
        with anyio.fail_after(60):
            await source.forward(bus, until=lambda e: isinstance(e, TrainEnded))
            assert await proc.wait() == 0
        source.close()
        await bus.drain(10)
    steps = [e.step for e in got if isinstance(e, StepEnded)]
    assert steps == list(range(40))
    assert isinstance(got[-1], TrainEnded)
    assert got[-1].status == "completed"


@pytest.mark.slow
def test_missing_redis_extra_names_the_install_command() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from evsys_async.transports import RedisStreamSink\n"
        "try:\n    RedisStreamSink()\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'evsys-async[redis]'" in out.stdout


@pytest.mark.slow
def test_without_redis_the_redis_tests_skip_saying_how_to_start_it(tmp_path: Path) -> None:
    """The README's test command on a machine without Redis: skips that say what to do."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["EVSYS_TEST_REDIS_URL"] = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    env["TMPDIR"] = str(tmp_path)  # where the inner session keeps its tmp_path dirs
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            f"{__file__}::test_redis_stream_carries_every_event_in_order",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 skipped" in proc.stdout, proc.stdout
    assert "no Redis reachable at redis://127.0.0.1:1/0; start one with: " in proc.stdout
    assert "redis-server --daemonize yes --port 6379 --save ''" in proc.stdout
    env["CI"] = "true"  # .ci/run: a missing Redis fails, it is never skipped quietly
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            f"{__file__}::test_redis_stream_carries_every_event_in_order",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1 and "2 errors" in proc.stdout, proc.stdout
