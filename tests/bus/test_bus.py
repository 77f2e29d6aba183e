"""EventBus, the facade: entering and leaving, subscribe, publish, stats, order, close.

Everything runs on asyncio and on trio. What happens behind the facade has a
test file per module beside this one: ``test_intake.py`` (numbering, publishing from
other threads), ``test_routing.py`` (which subscribers an event reaches),
``test_pump.py`` (batching, lag, drain and barriers), ``test_subscription.py`` (the
handle ``subscribe`` returns); and in ``delivery/``, ``test_base.py``, ``test_task.py``,
``test_thread.py`` and ``test_process.py`` (how a handler runs), ``test_wire.py`` (what
crosses to a subscriber's process).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint

import evsys_async as ev
from evsys_async.events import (
    StepEnded,
)
from tests.bus.helpers import (
    WAIT,
    BusTestEvalPlus,
    BusTestPing,
    Counter,
    Rec,
    SyncRec,
    ThrTestMsg,
    failure_messages,
    ping,
    step,
    steps_of,
)

pytestmark = pytest.mark.anyio


# -- entering and subscribing ------------------------------------------------------


async def test_subscribe_outside_the_block_raises_bus_closed() -> None:
    bus = ev.EventBus(close_timeout=5)
    with pytest.raises(ev.BusClosedError, match="async with EventBus"):
        bus.subscribe(Rec())
    with anyio.fail_after(WAIT):
        async with bus:
            await checkpoint()  # see test_a_block_that_never_yields_can_be_left
        with pytest.raises(ev.BusClosedError):
            bus.subscribe(Rec())
        with pytest.raises(ev.BusClosedError, match="entered once"):
            async with bus:
                pass
    assert isinstance(ev.BusClosedError("x"), RuntimeError)


@pytest.mark.slow
@pytest.mark.parametrize("body", ["pass", "bus.publish(StepEnded(step=0, num_steps=1))"])
def test_a_block_that_never_yields_can_be_left(anyio_backend: str, body: str) -> None:
    # Leaving the block cancels the pump through the shielded scope the pump
    # registers when it starts; a block that never yields leaves before the pump
    # has started, the shielded pump then waits forever and __aexit__ never
    # returns (fail_after cannot help: the pump is shielded), so this runs in a
    # child process.
    code = textwrap.dedent(
        f"""
        import anyio, evsys_async as ev
        from evsys_async.events import StepEnded
        async def main():
            async with ev.EventBus(close_timeout=5) as bus:
                {body}
        anyio.run(main, backend={anyio_backend!r})
        print("left")
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        pytest.fail("`async with EventBus(): pass` never returned")
    assert out.returncode == 0 and out.stdout.strip() == "left", out.stderr


async def test_handler_signature_and_arguments_checked_at_subscribe() -> None:
    def none() -> None: ...
    def two(event: Any, other: Any) -> None: ...
    def kw_only(*, event: Any) -> None: ...
    def with_default(event: Any, extra: int = 1) -> None: ...
    def star(*args: Any) -> None: ...

    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            for bad in (none, two, kw_only):
                with pytest.raises(TypeError, match="must accept one positional argument"):
                    bus.subscribe(bad)
            with pytest.raises(TypeError, match="callable"):
                bus.subscribe(42)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="Event subclasses"):
                bus.subscribe(Rec(), events=(int,))  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="policy"):
                bus.subscribe(Rec(), policy="latest")  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="timeout"):
                bus.subscribe(Rec(), timeout=0)
            bus.subscribe(with_default)
            bus.subscribe(star)
            bus.subscribe(functools.partial(two, "bound"))
            assert set(bus.stats()) == {"with_default", "star", "two"}


async def test_async_runs_on_the_loop_def_in_its_own_thread_and_sync_overrides() -> None:
    loop_thread = threading.get_ident()
    seen: dict[str, set[int]] = {"async": set(), "def": set(), "forced": set()}

    async def a(event: Any) -> None:
        seen["async"].add(threading.get_ident())

    def d(event: Any) -> None:
        seen["def"].add(threading.get_ident())

    def returns_awaitable(event: Any) -> Any:  # a plain def that returns a coroutine
        async def inner() -> None:
            seen["forced"].add(threading.get_ident())

        return inner()

    async with ev.EventBus(close_timeout=5) as bus:
        sa = bus.subscribe(a)
        sd = bus.subscribe(d)
        sf = bus.subscribe(returns_awaitable, sync=False)
        assert sa.is_async and not sd.is_async and sf.is_async
        for i in range(5):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert seen["async"] == {loop_thread} == seen["forced"]
    assert len(seen["def"]) == 1 and loop_thread not in seen["def"]


async def test_bus_ids_differ_by_default() -> None:
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as a, ev.EventBus(close_timeout=5) as b:
            assert a.bus_id != b.bus_id and a.last_seq == -1
            await checkpoint()


async def test_publish_rejects_non_events() -> None:
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            with pytest.raises(TypeError):
                bus.publish("not an event")  # type: ignore[arg-type]
            with pytest.raises(TypeError):
                await bus.publish_and_wait("not an event")  # type: ignore[arg-type]
            await checkpoint()


async def test_handler_that_subscribes_and_publishes_does_not_deadlock() -> None:
    late = Rec()

    async def spawner(event: BusTestPing) -> None:
        if event.n == 0:
            bus.subscribe(late, events=(StepEnded,))
        bus.publish(step(event.n))
        await bus.publish_and_wait(step(event.n + 100), timeout=WAIT)

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(spawner, events=(BusTestPing,))
        with anyio.fail_after(WAIT):
            for i in range(3):
                await bus.publish_and_wait(ping(i), timeout=WAIT)
    assert steps_of(late.items) == [0, 100, 1, 101, 2, 102]


# -- stats ---------------------------------------------------------------------------


async def test_stats_names_unique_and_fields_current() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        gate = anyio.Event()

        async def blocked(event: Any) -> None:
            await gate.wait()

        bus.subscribe(Rec(), name="log")
        bus.subscribe(Rec(), name="log")
        bus.subscribe(Rec(), name="log")
        bus.subscribe(blocked)
        bus.subscribe(SyncRec())  # default name: the callable's class
        bus.subscribe(SyncRec())
        assert list(bus.stats()) == ["log", "log#2", "log#3", "blocked", "SyncRec", "SyncRec#2"]
        for i in range(10):
            bus.publish(step(i))
        # on the loop thread stats() takes in everything published so far
        st = bus.stats()
        assert sum(s.pending for s in st.values()) == 6 * 10
        assert all(isinstance(s, ev.SubscriberStats) for s in st.values())
        with anyio.fail_after(WAIT):
            report = await bus.drain(timeout=0.2)
            assert not report.ok and set(report.pending) == {"blocked"}
            st = bus.stats()
            for name in ("log", "log#2", "log#3", "SyncRec", "SyncRec#2"):
                assert st[name].delivered == 10 and st[name].pending == 0
                assert st[name].failed == st[name].dropped == 0
                assert st[name].max_pending >= 1 and st[name].handler_seconds >= 0
            assert st["blocked"].delivered == 0
            assert st["blocked"].max_pending >= 9
            gate.set()
            assert (await bus.drain()).ok
        assert bus.stats()["blocked"].delivered == 10
        assert bus.stats()["blocked"].handler_seconds > 0


async def test_stats_from_another_thread_is_safe() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(Counter(0), name="c")
        for i in range(10):
            bus.publish(ThrTestMsg(source="loop", i=i))
        with anyio.fail_after(WAIT):
            await bus.drain()
            st = await anyio.to_thread.run_sync(bus.stats)
    assert st["c"].delivered == 10


@pytest.mark.anyio
async def test_a_long_lived_bus_lets_old_ended_subscriptions_go() -> None:
    """A service bus that runs many loops must not keep every ended callback."""
    names: list[str] = []
    async with ev.EventBus(close_timeout=5) as bus:

        async def handler(event: ev.Event) -> None:
            pass

        for _ in range(300):
            sub = bus.subscribe(handler, name="run-callback")
            names.append(sub.name)
            with anyio.fail_after(5):
                assert await sub.aclose(5)
        kept = bus.stats()
        assert len(kept) <= 256
        assert set(names[-200:]) <= set(kept)  # the newest are kept
        assert len(set(names)) < 300  # released names were reused, not numbered forever


# -- order ---------------------------------------------------------------------------


async def test_per_subscriber_order_with_handlers_that_publish() -> None:
    async def echo(event: StepEnded) -> None:
        if event.step % 7 == 0:
            await checkpoint()
            bus.publish(ping(event.step))

    def echo_sync(event: StepEnded) -> None:
        if event.step % 5 == 0:
            bus.publish(BusTestEvalPlus(step=event.step, eval_name="from-thread"))

    async with ev.EventBus(batch_size=8, close_timeout=5) as bus:
        recs = [Rec(), SyncRec(), Rec(), SyncRec()]
        for r in recs:
            bus.subscribe(r, envelopes=True)
        bus.subscribe(echo, events=(StepEnded,))
        bus.subscribe(echo_sync, events=(StepEnded,))
        for i in range(300):
            bus.publish(step(i))
            if i % 50 == 0:
                await checkpoint()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    reference = [e.seq for e in recs[0].items]
    assert reference == sorted(reference) and len(set(reference)) == len(reference)
    assert len(reference) == 300 + len(range(0, 300, 7)) + len(range(0, 300, 5))
    for r in recs[1:]:
        assert [e.seq for e in r.items] == reference
    assert steps_of([e.event for e in recs[0].items]) == list(range(300))


# -- close: leaving the block drains, shielded -------------------------------------


async def test_leaving_the_block_drains_everything() -> None:
    slow_got: list[int] = []

    async def slow(event: StepEnded) -> None:
        for _ in range(3):
            await checkpoint()
        slow_got.append(event.step)

    def slow_sync(event: StepEnded) -> None:
        sync_got.append(event.step)

    sync_got: list[int] = []
    n = 500
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            bus.subscribe(slow)
            bus.subscribe(slow_sync)
            for i in range(n):
                bus.publish(step(i))
            assert bus.stats()["slow"].pending > 0
    assert slow_got == sync_got == list(range(n))
    st = bus.stats()
    assert st["slow"].delivered == st["slow_sync"].delivered == n


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_close_drains_when_the_enclosing_scope_is_cancelled(how: str) -> None:
    got: list[int] = []
    sync_got: list[int] = []
    after_block = False
    n = 300

    async def slow(event: StepEnded) -> None:
        for _ in range(3):
            await checkpoint()
        got.append(event.step)

    def slow_sync(event: StepEnded) -> None:
        sync_got.append(event.step)

    with anyio.fail_after(WAIT):
        with anyio.CancelScope() as scope:
            async with ev.EventBus(close_timeout=5) as bus:
                bus.subscribe(slow)
                bus.subscribe(slow_sync)
                for i in range(n):
                    bus.publish(step(i))
                assert bus.stats()["slow"].pending > 0
                if how == "cancel":
                    scope.cancel()
                else:
                    scope.deadline = anyio.current_time()  # a move_on_after that expired
                await anyio.sleep_forever()
            after_block = True  # not reached: the cancellation propagates
        assert scope.cancelled_caught
    assert not after_block
    assert got == sync_got == list(range(n))


async def test_close_under_move_on_after_with_a_handler_still_holding() -> None:
    gate = anyio.Event()
    got: list[int] = []

    async def held(event: StepEnded) -> None:
        await gate.wait()
        got.append(event.step)

    async def opener() -> None:
        await wait_all_tasks_blocked()
        gate.set()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            with anyio.move_on_after(WAIT) as scope:
                async with ev.EventBus(close_timeout=5) as bus:
                    bus.subscribe(held)
                    for i in range(10):
                        bus.publish(step(i))
                    scope.cancel()
                    tg.start_soon(opener)  # opens the gate once the close is waiting
                    await checkpoint()
            assert scope.cancelled_caught
    assert got == list(range(10))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_asyncio_cancel_inside_the_drain_is_reraised_after_it() -> None:
    import asyncio

    gate = anyio.Event()
    got: list[int] = []
    in_close = anyio.Event()

    async def held(event: StepEnded) -> None:
        await gate.wait()
        got.append(event.step)

    async def body() -> None:
        async with ev.EventBus(close_timeout=5) as bus:
            bus.subscribe(held)
            for i in range(10):
                bus.publish(step(i))
            in_close.set()
        raise AssertionError("not reached: the cancel is re-raised after the drain")

    with anyio.fail_after(WAIT):
        task = asyncio.get_running_loop().create_task(body())
        await in_close.wait()
        await wait_all_tasks_blocked()  # now inside the shielded drain
        task.cancel()  # uvicorn's shutdown, a nested asyncio.timeout ...
        await wait_all_tasks_blocked()
        assert not task.done()  # still draining
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert got == list(range(10))


async def test_close_deadline_logs_what_was_left(warnings_log: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    def hangs(event: Any) -> None:
        release.wait()

    try:
        with anyio.fail_after(WAIT):
            async with ev.EventBus(close_timeout=0.2) as bus:
                bus.subscribe(hangs)
                for i in range(5):
                    bus.publish(step(i))
    finally:
        release.set()
    messages = failure_messages(warnings_log)
    [left] = [m for m in messages if "undelivered" in m]
    assert "subscriber=hangs" in left and "pending=" in left
    assert any("deadline" in m and "hangs" in m for m in messages)


async def test_block_error_propagates_unwrapped_after_the_drain() -> None:
    got = Rec()

    async def body() -> None:
        async with ev.EventBus(close_timeout=5) as bus:
            bus.subscribe(got)
            for i in range(50):
                bus.publish(step(i))
            raise KeyError("mine")

    with anyio.fail_after(WAIT):
        with pytest.raises(KeyError, match="mine"):
            await body()
    assert steps_of(got.items) == list(range(50))
