"""RedisStreamSink against real Redis servers: every event type round-trips, a Redis that
goes away mid-run costs the loop nothing and loses nothing, and no credential leaks."""

from __future__ import annotations

import math
import os
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import evsys_async as ev
from evsys_async.callbacks import SinkCallback
from evsys_async.config import build_loop, load_config
from evsys_async.events import (
    BenchmarkEvaluated,
    CallbackFailed,
    CheckpointSaved,
    EvalEnded,
    EvalFailed,
    ExperimentEnded,
    ExperimentStarted,
    GroupStarted,
    RunEnded,
    RunStarted,
    StepEnded,
    StopRequested,
    SubscriberLagged,
    TrainEnded,
    TrainStarted,
)
from evsys_async.transports import RedisStreamSink, RedisStreamSource, attach
from evsys_async.transports.redis import events_stream
from tests.transports.redis_server import OwnRedis, own_redis

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # Redis: its own, the shared one, or none


class RemoteSpike(ev.Event):
    """A user event type that crosses the wire."""

    step: int
    values: dict[str, list[int]]


@pytest.fixture
def run_key(redis_url: str) -> Iterator[str]:
    import redis

    key = f"test-{uuid.uuid4().hex[:12]}"
    yield key
    client = redis.Redis.from_url(redis_url)
    client.delete(*(f"evsys:{key}:{kind}" for kind in ("events", "dead", "consumers")))
    client.close()


def every_event_type(run_key: str) -> list[ev.Event]:
    """One event of each type, with values that are easy to get wrong on the wire."""
    common: dict[str, Any] = {"run_key": run_key, "rank": 3}
    return [
        TrainStarted(num_steps=10, start_step=2, output_dir="/tmp/x", world_size=4, **common),
        StepEnded(step=2, num_steps=10, metrics={"loss": 0.5, "big": math.inf}, **common),
        EvalEnded(step=2, eval_name="val", metrics={"acc": 0.25}, **common),
        EvalFailed(step=2, eval_name="remote", error="TimeoutError: 10 s", **common),
        CheckpointSaved(step=2, name="best", path=None, row={"a": [1, {"b": None}]}, **common),
        StopRequested(step=2, reason="patience", source="EarlyStoppingCallback", **common),
        TrainEnded(
            status="stopped",
            steps_completed=3,
            num_steps=10,
            stop_reason="nan",
            train_seconds=1.5,
            stop_rank=2,
            **common,
        ),
        ExperimentStarted(name="exp", **common),
        GroupStarted(group_name="g", **common),
        RunStarted(arm="a", repeat=1, **common),
        BenchmarkEvaluated(step=None, eval_result={"name": "b"}, predictions=[1, "x"], **common),
        RunEnded(arm="a", result={"m": 1.0}, **common),
        ExperimentEnded(result={"best": "a"}, **common),
        CallbackFailed(subscriber="cb", hook="on_step_end", event_type="StepEnded", error="x"),
        SubscriberLagged(subscriber="slow", pending=1000, dropped=2, **common),
        RemoteSpike(step=2, values={"x": [1, 2]}, **common),
        # a type the consumer does not know: it comes through as what it was
        ev.events.UnknownEvent(event_type="NotDefinedHere", fields={"x": [1]}, **common),
    ]


async def test_every_event_type_round_trips(redis_url: str, run_key: str) -> None:
    sent = every_event_type(run_key)
    builtin = {t for t in ev.events.event_types().values() if t.__module__ == ev.events.__name__}
    assert {type(e) for e in sent} == (builtin - {ev.Event}) | {RemoteSpike}
    sink = RedisStreamSink(redis_url, run_key)
    async with ev.EventBus() as bus:
        attach(bus, sink)
        for event in sent:
            bus.publish(event)
    assert sink.stats().sent == len(sent)

    got: list[ev.Event] = []
    async with ev.EventBus() as local:

        async def collect(event: ev.Event) -> None:
            got.append(event)

        local.subscribe(collect)
        source = RedisStreamSource(redis_url, run_key, group="round-trip")
        with anyio.fail_after(20):
            await source.forward(local, until=lambda e: isinstance(e, ev.events.UnknownEvent))
        source.close()
    assert got == sent
    assert {e.rank for e in got} == {0, 3}  # CallbackFailed kept the default


async def test_the_stream_is_named_after_the_run_and_trimmed(redis_url: str, run_key: str) -> None:
    import redis

    sink = RedisStreamSink(redis_url, maxlen=200)
    with anyio.fail_after(30):
        async with ev.EventBus() as bus:
            attach(bus, sink)
            for i in range(3000):
                bus.publish(StepEnded(step=i, num_steps=3000, run_key=run_key))
    client = redis.Redis.from_url(redis_url)
    length = client.xlen(events_stream(run_key))
    client.close()
    assert 200 <= length < 3000  # approximate MAXLEN: whole nodes are trimmed
    assert sink.stats().sent == 3000


async def test_redis_stopped_and_restarted_mid_run(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    """The loop runs every step while Redis is down (counted); once it is back, every
    event arrives, in order, exactly once at a consumer group that followed along."""
    n, stop_at, restart_at = 120, 40, 90
    key = "outage"
    with own_redis() as server:
        sink = RedisStreamSink(server.url, max_buffered=10, backoff=(0.01, 0.2), close_timeout=60)
        steps_seen: list[int] = []
        caught_up = anyio.Event()
        ended = anyio.Event()
        down = False
        steps_while_down = 0

        async def collect(event: ev.Event) -> None:
            if isinstance(event, StepEnded):
                steps_seen.append(event.step)
                if event.step == stop_at - 1:
                    caught_up.set()
            elif isinstance(event, TrainEnded):
                ended.set()

        async def step(state: ev.LoopState, i: int) -> dict[str, float]:
            nonlocal down, steps_while_down
            if i == stop_at:
                await caught_up.wait()  # the consumer has every step before this one
                await anyio.to_thread.run_sync(server.stop)
                down = True
            if i == restart_at:
                # the steps since the stop are flushed within a batch delay: the sink
                # tries to send them, and finds Redis away (counted, not raced)
                while sink.stats().outages < 1:
                    await anyio.sleep(0.005)
                await anyio.to_thread.run_sync(server.start)
                down = False
            if down:
                steps_while_down += 1
            return {"loss": 1.0 / (i + 1)}

        async with ev.EventBus() as consumer_bus:
            consumer_bus.subscribe(collect)
            source = RedisStreamSource(server.url, key, group="follow", block_ms=50)
            with anyio.fail_after(90):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(
                        lambda: source.forward(
                            consumer_bus, until=lambda e: isinstance(e, TrainEnded)
                        )
                    )
                    loop = ev.TrainingLoop(
                        step,
                        num_steps=n,
                        output_dir=tmp_path,
                        run_key=key,
                        callbacks=[SinkCallback(sink)],
                    )
                    artifacts = await loop.run()
                    await ended.wait()
            source.close()
    assert artifacts.status == "completed" and artifacts.steps_completed == n
    assert steps_while_down == restart_at - stop_at
    assert steps_seen == list(range(n))  # none lost, none twice, in order
    stats = sink.stats()
    assert stats.outages == 1 and stats.spilled_total > 0 and stats.buffered == 0
    assert stats.spilled == 0 and stats.sent >= stats.accepted == n + 2
    assert artifacts.callback_report["RedisStreamSink"].failed == 0
    sink_warnings = [r for r in warnings_log.records if "the sink keeps the events" in r.message]
    assert len(sink_warnings) == 1  # one WARNING per outage
    assert not (tmp_path / key / "redis-spill.bin").exists()  # all sent: the file is gone


async def test_unsent_envelopes_stay_in_the_spill_file_for_the_next_sink(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    server = OwnRedis()  # not started: Redis is down the whole run
    spill = tmp_path / "spill.bin"
    down = RedisStreamSink(server.url, "left", spill_path=spill, max_buffered=5, close_timeout=0.2)
    async with ev.EventBus() as bus:
        attach(bus, down)
        for i in range(30):
            bus.publish(StepEnded(step=i, num_steps=30))
    assert down.stats().sent == 0 and down.stats().spilled == 30
    assert (
        "they are kept in the spill file" in warnings_log.text and str(spill) in warnings_log.text
    )

    server.start()
    try:
        later = RedisStreamSink(server.url, "left", spill_path=spill)
        async with ev.EventBus() as bus:
            attach(bus, later)
            bus.publish(StepEnded(step=30, num_steps=31))
        got: list[int] = []
        async with ev.EventBus() as local:

            async def collect(event: StepEnded) -> None:
                got.append(event.step)

            local.subscribe(collect, events=(StepEnded,))
            source = RedisStreamSource(server.url, "left")
            with anyio.fail_after(20):
                await source.forward(local, until=lambda e: getattr(e, "step", 0) == 30)
            source.close()
    finally:
        server.stop()
    assert got == list(range(31))  # the earlier run's first, in order
    assert not spill.exists()


async def test_flush_never_waits_for_redis(warnings_log: pytest.LogCaptureFixture) -> None:
    """With nothing listening, the sink's subscriber stays healthy: no failure, no wait."""
    sink = RedisStreamSink(OwnRedis().url, "nowhere", close_timeout=0.0)
    async with ev.EventBus() as bus:
        sub = attach(bus, sink, name="redis")
        for i in range(200):
            bus.publish(StepEnded(step=i, num_steps=200))
        with anyio.fail_after(20):
            assert (await bus.drain(20)).ok
        assert sub.stats().delivered == 200 and sub.stats().failed == 0
        assert sub.stats().hook_failures == 0
    stats = sink.stats()
    assert stats.accepted == 200 and stats.sent == 0 and not stats.connected
    assert stats.last_error is not None and "Connection refused" in stats.last_error
    # no run dir, no spill_path: what is unsent stays in a temp file, named in the stats
    assert stats.spill_path is not None and stats.spilled == 200
    left = Path(stats.spill_path)
    assert left.parent == Path(tempfile.gettempdir()) and os.stat(left).st_size > 0
    os.remove(left)  # the test's to remove: a user would hand it to the next sink


def _all_text(root: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()
    )


async def test_a_password_in_the_url_appears_nowhere(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    password, wrong = "s3cret-planted-pw", "wr0ng-planted-pw"
    monkeypatch.setenv("EVSYS_TEST_WRONG_URL", f"redis://:{wrong}@127.0.0.1:1/0")
    with own_redis(password=password) as server:
        config = tmp_path / "run.yaml"
        config.write_text(
            textwrap.dedent(
                f"""
                name: secret
                output_dir: {tmp_path / "runs"}
                num_steps: 20
                evaluators: [{{kind: demo_accuracy, params: {{run_every: 10}}}}]
                callbacks:
                  - {{kind: local_logger, params: {{print_every: 0}}}}
                  - {{kind: csv_metrics, params: {{out_path: metrics.csv}}}}
                  - {{kind: evsys_logger}}
                transports:
                  - {{kind: redis, params: {{url: "{server.url}"}}}}
                  - {{kind: redis, params: {{url_env: EVSYS_TEST_WRONG_URL, close_timeout: 0.1}}}}
                """
            )
        )
        loop = build_loop(load_config(config))  # type: ignore[arg-type]
        with anyio.fail_after(60):
            artifacts = await loop.run()
        assert artifacts.status == "completed"
        import redis

        client = redis.Redis.from_url(server.url)
        entries = client.xrange(events_stream("secret"))
        client.close()
    assert len(entries) == artifacts.callback_report["RedisStreamSink"].delivered
    stream_text = b"".join(f[b"envelope"] for _, f in entries).decode()
    files = _all_text(tmp_path / "runs")
    assert "127.0.0.1" in warnings_log.text  # the wrong URL was named, redacted
    for secret in (password, wrong):
        assert secret not in files
        assert secret not in warnings_log.text
        assert secret not in stream_text
    assert "redis://:***@127.0.0.1" in files  # the recorded config keeps the URL, redacted
    assert msgspec.json.decode(entries[0][1][b"envelope"])["event"]["run_key"] == "secret"
