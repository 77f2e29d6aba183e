"""RedisStreamSource as an at-least-once consumer group member, against the real Redis."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import evsys_async as ev
from evsys_async.events import Envelope, StepEnded, TrainEnded, encode
from evsys_async.transports import RedisStreamSource, RedisUnavailableError
from evsys_async.transports.redis import dead_stream, events_stream
from tests.transports.redis_server import OwnRedis

pytestmark = pytest.mark.anyio


@pytest.fixture
def run_key(redis_url: str) -> Iterator[str]:
    key = f"test-{uuid.uuid4().hex[:12]}"
    yield key
    client = _client(redis_url)
    client.delete(*(f"evsys:{key}:{kind}" for kind in ("events", "dead", "consumers")))
    client.close()


def _client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def _add(url: str, run_key: str, envelopes: list[Envelope]) -> list[str]:
    client = _client(url)
    ids = [
        client.xadd(events_stream(run_key), {"envelope": encode(env)}).decode() for env in envelopes
    ]
    client.close()
    return ids


def _steps(
    run_key: str, seqs: list[int], *, rank: int = 0, bus: str = "producer"
) -> list[Envelope]:
    return [
        Envelope(bus, seq, StepEnded(step=seq, num_steps=100, run_key=run_key, rank=rank))
        for seq in seqs
    ]


def _end(run_key: str, seq: int, *, rank: int = 0, bus: str = "producer") -> Envelope:
    return Envelope(
        bus,
        seq,
        TrainEnded(status="completed", steps_completed=1, num_steps=1, run_key=run_key, rank=rank),
    )


async def _collect(
    source: RedisStreamSource, *, until: Any = None, handler: Any = None
) -> list[ev.Event]:
    got: list[ev.Event] = []
    async with ev.EventBus() as bus:

        async def collect(event: ev.Event) -> None:
            got.append(event)

        bus.subscribe(handler or collect)
        with anyio.fail_after(30):
            await source.forward(bus, until=until or (lambda e: isinstance(e, TrainEnded)))
    return got


def _pending(url: str, run_key: str, group: str) -> int:
    client = _client(url)
    count = int(client.xpending(events_stream(run_key), group)["pending"])
    client.close()
    return count


async def test_entries_are_acknowledged_only_after_the_subscribers_handled_them(
    redis_url: str, run_key: str
) -> None:
    _add(redis_url, run_key, [*_steps(run_key, list(range(5))), _end(run_key, 5)])
    started = anyio.Event()
    release = threading.Event()
    pending_while_handling: list[int] = []
    token = anyio.lowlevel.current_token()

    def slow(event: ev.Event) -> None:  # a def handler: it blocks its own thread only
        if isinstance(event, StepEnded) and event.step == 2:
            anyio.from_thread.run_sync(started.set, token=token)
            release.wait(30)

    source = RedisStreamSource(redis_url, run_key, group="g")
    async with ev.EventBus() as bus:
        bus.subscribe(slow)
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    lambda: source.forward(bus, until=lambda e: isinstance(e, TrainEnded))
                )
                await started.wait()
                pending_while_handling.append(
                    await anyio.to_thread.run_sync(_pending, redis_url, run_key, "g")
                )
                release.set()
    source.close()
    assert pending_while_handling == [6]  # read, published, not acknowledged
    assert _pending(redis_url, run_key, "g") == 0
    assert source.stats().acked == 6


async def test_an_entry_that_does_not_decode_goes_to_the_dead_letter_stream(
    redis_url: str, run_key: str, warnings_log: pytest.LogCaptureFixture
) -> None:
    _add(redis_url, run_key, _steps(run_key, [0, 1]))
    client = _client(redis_url)
    bad = client.xadd(events_stream(run_key), {"envelope": b'{"bus_id": "x", "seq": "one"}'})
    junk = client.xadd(events_stream(run_key), {"something": b"else"})
    client.close()
    _add(redis_url, run_key, [*_steps(run_key, [2]), _end(run_key, 3)])
    source = RedisStreamSource(redis_url, run_key, group="g")
    with anyio.fail_after(30):
        got = await _collect(source)
    source.close()
    assert [e.step for e in got if isinstance(e, StepEnded)] == [0, 1, 2]  # it went on
    client = _client(redis_url)
    dead = client.xrange(dead_stream(run_key))
    client.close()
    assert [f[b"source_id"] for _, f in dead] == [bad, junk]
    assert b"Expected `int`, got `str` - at `$.seq`" in dead[0][1][b"error"]
    assert dead[0][1][b"envelope"] == b'{"bus_id": "x", "seq": "one"}'  # the entry, as it was
    assert dead[1][1][b"something"] == b"else" and dead[1][1][b"group"] == b"g"
    assert _pending(redis_url, run_key, "g") == 0  # acknowledged
    assert source.stats().dead == 2
    assert f"entry={bad.decode()}" in warnings_log.text


async def test_duplicates_are_dropped_by_a_window_not_a_high_water_mark(
    redis_url: str, run_key: str
) -> None:
    """A retried chunk repeats entries; a claimed entry arrives after newer ones: the
    first must be dropped, the second must not."""
    _add(redis_url, run_key, [*_steps(run_key, [0, 1, 2, 4, 5, 3, 3, 1]), _end(run_key, 6)])
    source = RedisStreamSource(redis_url, run_key, group="g")
    with anyio.fail_after(30):
        got = await _collect(source)
    source.close()
    assert [e.step for e in got if isinstance(e, StepEnded)] == [0, 1, 2, 4, 5, 3]
    assert source.stats().duplicates == 2


async def test_entries_a_dead_consumer_left_pending_are_claimed(
    redis_url: str, run_key: str
) -> None:
    _add(redis_url, run_key, _steps(run_key, list(range(5))))
    client = _client(redis_url)
    stream = events_stream(run_key)
    client.xgroup_create(stream, "g", id="0")
    taken = client.xreadgroup("g", "dead-host", {stream: ">"}, count=5)  # then it died
    client.close()
    assert len(taken[0][1]) == 5
    _add(redis_url, run_key, [*_steps(run_key, [5]), _end(run_key, 6)])
    source = RedisStreamSource(redis_url, run_key, group="g", consumer="alive", claim_after=0.05)
    got: list[ev.Event] = []

    def until(event: ev.Event) -> bool:
        got.append(event)
        return len([e for e in got if isinstance(e, StepEnded)]) == 6

    with anyio.fail_after(30):
        await _collect(source, until=until)
    source.close()
    assert sorted(e.step for e in got if isinstance(e, StepEnded)) == list(range(6))
    assert source.stats().claimed == 5
    client = _client(redis_url)
    consumers = {c["name"]: c["pending"] for c in client.xinfo_consumers(stream, "g")}
    client.close()
    assert consumers[b"dead-host"] == 0


async def test_a_restarted_consumer_reads_its_own_pending_entries_first(
    redis_url: str, run_key: str
) -> None:
    _add(redis_url, run_key, _steps(run_key, list(range(4))))
    client = _client(redis_url)
    stream = events_stream(run_key)
    client.xgroup_create(stream, "g", id="0")
    client.xreadgroup("g", "me", {stream: ">"}, count=4)  # read, then killed before the ack
    client.close()
    _add(redis_url, run_key, [*_steps(run_key, [4]), _end(run_key, 5)])
    # claim_after far away: only reading its own pending entries brings 0-3 back
    source = RedisStreamSource(redis_url, run_key, group="g", consumer="me", claim_after=3600)
    with anyio.fail_after(30):
        got = await _collect(source)
    source.close()
    assert [e.step for e in got if isinstance(e, StepEnded)] == [0, 1, 2, 3, 4]
    assert source.stats().claimed == 0


async def test_a_rank_filter_keeps_one_rank(redis_url: str, run_key: str) -> None:
    envelopes = [
        *_steps(run_key, [0, 1], rank=0, bus="r0"),
        *_steps(run_key, [0, 1], rank=1, bus="r1"),
        _end(run_key, 2, rank=0, bus="r0"),
        _end(run_key, 2, rank=1, bus="r1"),
    ]
    _add(redis_url, run_key, envelopes)
    source = RedisStreamSource(redis_url, run_key, group="rank1", rank=1)
    with anyio.fail_after(30):
        got = await _collect(source)
    source.close()
    assert {e.rank for e in got} == {1} and len(got) == 3
    assert source.stats().skipped == 3
    assert _pending(redis_url, run_key, "rank1") == 0


async def test_stopping_mid_batch_leaves_the_rest_unacknowledged(
    redis_url: str, run_key: str
) -> None:
    _add(redis_url, run_key, _steps(run_key, list(range(10))))
    source = RedisStreamSource(redis_url, run_key, group="g")
    with anyio.fail_after(30):
        got = await _collect(source, until=lambda e: getattr(e, "step", None) == 3)
    source.close()
    assert len(got) == 4
    assert _pending(redis_url, run_key, "g") == 6  # read in the same batch, not handled


async def test_without_a_group_the_source_is_an_observer(redis_url: str, run_key: str) -> None:
    _add(redis_url, run_key, [*_steps(run_key, [0, 1, 1]), _end(run_key, 2)])
    with anyio.fail_after(30):
        got = await _collect(RedisStreamSource(redis_url, run_key))
    assert [type(e).__name__ for e in got] == ["StepEnded", "StepEnded", "TrainEnded"]
    client = _client(redis_url)
    assert client.xinfo_groups(events_stream(run_key)) == []  # no group, nothing acked
    client.close()


def test_redis_unreachable_at_start_names_the_url_redacted() -> None:
    url = f"redis://:hunter2-pw@127.0.0.1:{OwnRedis().port}/0"
    source = RedisStreamSource(url, "nowhere", group="g")
    with pytest.raises(RedisUnavailableError) as info:
        source.prepare()
    message = str(info.value)
    assert "cannot reach Redis at redis://:***@127.0.0.1" in message
    assert "hunter2" not in message and "is the server running" in message


def test_bad_arguments_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="give the run's key"):
        RedisStreamSource("redis://127.0.0.1:6379/0")
    with pytest.raises(ValueError, match="consumer= needs group="):
        RedisStreamSource("redis://127.0.0.1:6379/0", "k", consumer="c")


async def test_prepare_finds_the_step_to_resume_at_and_what_to_hand_again(
    redis_url: str, run_key: str
) -> None:
    from evsys_async.events import EvalEnded, TrainStarted

    events: list[ev.Event] = [TrainStarted(num_steps=10, run_key=run_key)]
    for step in range(8):
        events.append(StepEnded(step=step, num_steps=10, run_key=run_key))
        if step == 4:
            events.append(EvalEnded(step=4, eval_name="val", run_key=run_key))
    ids = _add(redis_url, run_key, [Envelope("p", i, e) for i, e in enumerate(events)])
    client = _client(redis_url)
    stream = events_stream(run_key)
    client.xgroup_create(stream, "g", id="0")
    client.xreadgroup("g", "me", {stream: ">"}, count=9)  # TrainStarted .. EvalEnded(4)
    client.xack(stream, "g", *ids[:6])  # handled up to StepEnded(4); the eval was not
    client.close()
    source = RedisStreamSource(redis_url, run_key, group="g", consumer="me")
    point = source.prepare()
    assert point is not None
    # k = 4 (the eval of step 4 was not acknowledged); StepEnded(4) is handed again
    assert (point.start_step, point.replay_from, point.first_unacked) == (4, ids[5], ids[6])
    with anyio.fail_after(30):
        got = await _collect(source, until=lambda e: getattr(e, "step", None) == 7)
    source.close()
    assert [(type(e).__name__, e.step) for e in got][:3] == [  # type: ignore[attr-defined]
        ("StepEnded", 4),
        ("EvalEnded", 4),
        ("StepEnded", 5),
    ]
    assert source.stats().replayed == 1


def test_a_new_group_is_not_a_resume(redis_url: str, run_key: str) -> None:
    _add(redis_url, run_key, _steps(run_key, [0, 1]))
    source = RedisStreamSource(redis_url, run_key, group="fresh")
    assert source.prepare() is None
    source.close()


# -- ends and outages --------------------------------------------------------------------


async def _join_source_threads(source: RedisStreamSource) -> None:
    """Wait for the source's reader and acknowledger threads (a prefetched read ends
    when ``close`` breaks its connection, or after ``block_ms``)."""
    for thread in threading.enumerate():
        if thread.name.endswith(source.stream) and thread.name.startswith("evsys-redis"):
            await anyio.to_thread.run_sync(thread.join, 30)


@pytest.mark.parametrize("group", [None, "g"])
async def test_closing_a_source_after_forward_ends_quietly(
    group: str | None, redis_url: str, run_key: str, warnings_log: pytest.LogCaptureFixture
) -> None:
    """``forward`` returns with its next read blocked in Redis (prefetched while the
    last batch was handled); ``close`` then breaks that read: no outage, no WARNING."""
    _add(redis_url, run_key, [*_steps(run_key, [0, 1]), _end(run_key, 2)])
    source = RedisStreamSource(redis_url, run_key, group=group, block_ms=10_000)
    with anyio.fail_after(30):
        got = await _collect(source)
        source.close()
        await _join_source_threads(source)
    assert len(got) == 3
    assert source.stats().outages == 0
    assert not [r for r in warnings_log.records if "unreachable" in r.getMessage()]


@pytest.mark.slow  # a redis-server of its own
async def test_a_real_outage_warns_once(warnings_log: pytest.LogCaptureFixture) -> None:
    server = OwnRedis()
    server.start()
    key = "outage-source"
    try:
        source = RedisStreamSource(server.url, key, block_ms=50)
        with anyio.fail_after(60):
            async with ev.EventBus() as bus, anyio.create_task_group() as tg:
                got: list[ev.Event] = []

                async def collect(event: ev.Event) -> None:
                    got.append(event)

                bus.subscribe(collect)
                _add(server.url, key, _steps(key, [0]))
                tg.start_soon(
                    lambda: source.forward(bus, until=lambda e: isinstance(e, TrainEnded))
                )
                while not got:  # counted: the first entry came through
                    await anyio.sleep(0.01)
                await anyio.to_thread.run_sync(server.stop)
                while source.stats().outages < 1:  # the source noticed, and said so once
                    await anyio.sleep(0.01)
                await anyio.to_thread.run_sync(server.start)  # back, empty (no persistence)
                _add(server.url, key, [*_steps(key, [1]), _end(key, 2)])
        source.close()
        await _join_source_threads(source)
    finally:
        server.stop()
    assert [type(e).__name__ for e in got] == ["StepEnded", "StepEnded", "TrainEnded"]
    assert source.stats().outages == 1
    warned = [r for r in warnings_log.records if "Redis unreachable" in r.getMessage()]
    assert len(warned) == 1 and "reads on when it is back" in warned[0].getMessage()
