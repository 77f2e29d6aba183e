"""EventBus on the loop thread: subscribe, matching, order, isolation, barriers, close.

Everything runs on asyncio and on trio. Isolation is proven by counting, never
by a clock: a blocked handler waits on an ``anyio.Event`` or a
``threading.Event`` while the test checks what its siblings received. The
only clocks are handler ``timeout``s (which is what they test) and the
``fail_after`` around every wait.
"""

from __future__ import annotations

import functools
import itertools
import logging
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
from evsys_async.bus import is_async_callable
from evsys_async.events import (
    CallbackFailed,
    Envelope,
    EvalEnded,
    Event,
    StepEnded,
    SubscriberLagged,
    TrainEnded,
)

pytestmark = pytest.mark.anyio

WAIT = 10.0  # the fail_after around every wait: generous, never reached when all is well


class BusTestPing(Event):
    n: int = 0


class BusTestEvalPlus(EvalEnded):
    """A user subclass of a built-in event."""


def step(i: int, run_key: str = "") -> StepEnded:
    return StepEnded(step=i, num_steps=1000, run_key=run_key)


def ping(n: int) -> BusTestPing:
    return BusTestPing(n=n)


class Rec:
    """An ``async def`` handler that records what it gets; ``reached(n)`` waits for n."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._goal: tuple[int, anyio.Event] | None = None

    async def __call__(self, event: Any) -> None:
        self.items.append(event)
        if self._goal is not None and len(self.items) >= self._goal[0]:
            self._goal[1].set()

    async def reached(self, n: int) -> None:
        if len(self.items) >= n:
            return
        self._goal = (n, anyio.Event())
        await self._goal[1].wait()


class SyncRec:
    """A ``def`` handler that records what it gets and in which thread."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.threads: set[int] = set()

    def __call__(self, event: Any) -> None:
        self.threads.add(threading.get_ident())
        self.items.append(event)


async def thread_wait(evt: threading.Event, timeout: float = WAIT) -> None:
    """Wait for a ``threading.Event`` without blocking the loop (no bus barrier involved)."""
    assert await anyio.to_thread.run_sync(evt.wait, timeout), "threading.Event never set"


def steps_of(items: list[Any]) -> list[int]:
    return [e.step for e in items if isinstance(e, StepEnded)]


def failure_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "evsys_async" and r.levelno == logging.WARNING
    ]


# -- subscribe -----------------------------------------------------------------------


async def test_subscribe_outside_the_block_raises_bus_closed() -> None:
    bus = ev.EventBus(close_timeout=5)
    with pytest.raises(ev.BusClosedError, match="async with EventBus"):
        bus.subscribe(Rec())
    async with bus:
        await checkpoint()  # see test_a_block_that_never_yields_can_be_left
    with pytest.raises(ev.BusClosedError):
        bus.subscribe(Rec())
    with pytest.raises(ev.BusClosedError, match="entered once"):
        async with bus:
            pass
    assert isinstance(ev.BusClosedError("x"), RuntimeError)


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


async def _async_fn(event: Any) -> None:
    pass


def _sync_fn(event: Any) -> None:
    pass


class _AsyncCallable:
    async def __call__(self, event: Any) -> None:
        pass


class _SyncCallable:
    def __call__(self, event: Any) -> None:
        pass


class _Methods:
    async def a(self, event: Any) -> None:
        pass

    def s(self, event: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (_async_fn, True),
        (_sync_fn, False),
        (functools.partial(_async_fn), True),
        (functools.partial(functools.partial(_async_fn)), True),
        (functools.partial(_sync_fn), False),
        (_AsyncCallable(), True),
        (_SyncCallable(), False),
        (functools.partial(_AsyncCallable()), True),
        (_Methods().a, True),
        (_Methods().s, False),
        (lambda event: None, False),
    ],
    ids=repr,
)
def test_sync_or_async_detection(handler: Any, expected: bool) -> None:  # DESIGN rule 6
    assert is_async_callable(handler) is expected


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


# -- matching ------------------------------------------------------------------------


async def test_matching_by_type_subclasses_included() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        evals, everything, steps = Rec(), Rec(), Rec()
        bus.subscribe(evals, events=(EvalEnded,))
        bus.subscribe(everything)  # default: Event, i.e. all
        bus.subscribe(steps, events=[StepEnded, TrainEnded])  # any iterable of types
        published = [
            step(0),
            EvalEnded(step=0, eval_name="v"),
            BusTestEvalPlus(step=0, eval_name="plus"),
            ping(1),
            TrainEnded(status="completed", steps_completed=1, num_steps=1),
        ]
        for e in published:
            bus.publish(e)
        with anyio.fail_after(WAIT):
            await bus.drain()
    assert everything.items == published
    assert evals.items == published[1:3]
    assert steps.items == [published[0], published[4]]


async def test_run_key_filter_keeps_own_run_and_run_less_events() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        a, b, all_runs = Rec(), Rec(), Rec()
        bus.subscribe(a, run_key="a")
        bus.subscribe(b, run_key="b")
        bus.subscribe(all_runs)
        published = [step(0, "a"), step(0, "b"), ping(7), step(1, "a")]
        for e in published:
            bus.publish(e)
        with anyio.fail_after(WAIT):
            await bus.drain()
    assert a.items == [published[0], published[2], published[3]]
    assert b.items == [published[1], published[2]]
    assert all_runs.items == published


async def test_subscriber_sees_only_events_published_after_subscribe() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        early = Rec()
        bus.subscribe(early)
        bus.publish(ping(0))
        late = Rec()
        bus.subscribe(late)
        bus.publish(ping(1))
        with anyio.fail_after(WAIT):
            await bus.drain()
    assert [e.n for e in early.items] == [0, 1]
    assert [e.n for e in late.items] == [1]


# -- envelopes and sequence numbers (rule 9) ------------------------------------------


async def test_envelopes_carry_bus_id_and_strictly_increasing_seq() -> None:
    async with ev.EventBus(bus_id="bus-1", close_timeout=5) as bus:
        got, got_sync = Rec(), SyncRec()
        bus.subscribe(got, envelopes=True)
        bus.subscribe(got_sync, envelopes=True, events=(StepEnded,))
        seqs = [bus.publish(step(i)) if i % 2 else bus.publish(ping(i)) for i in range(50)]
        assert seqs == list(range(50)) and bus.last_seq == 49
        with anyio.fail_after(WAIT):
            await bus.drain()
    assert all(isinstance(e, Envelope) and e.bus_id == "bus-1" for e in got.items)
    assert [e.seq for e in got.items] == seqs
    assert [e.event.n for e in got.items if isinstance(e.event, BusTestPing)] == list(
        range(0, 50, 2)
    )
    assert [e.seq for e in got_sync.items] == list(range(1, 50, 2))
    assert all(e.event.step == e.seq for e in got_sync.items)


async def test_bus_ids_differ_by_default() -> None:
    async with ev.EventBus(close_timeout=5) as a, ev.EventBus(close_timeout=5) as b:
        assert a.bus_id != b.bus_id and a.last_seq == -1
        await checkpoint()


# -- stats (rule 2) ------------------------------------------------------------------


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


# -- hooks of a subscription (rule 18) --------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_on_start_before_first_event_on_batch_end_after_batches(kind: str) -> None:
    log: list[Any] = []
    if kind == "async":

        async def handler(event: Any) -> None:
            log.append(event.step)

        async def on_start() -> None:
            await checkpoint()
            log.append("start")

        async def on_batch_end() -> None:
            log.append("flush")
    else:

        def handler(event: Any) -> None:
            log.append(event.step)

        def on_start() -> None:
            log.append("start")

        def on_batch_end() -> None:
            log.append("flush")

    async with ev.EventBus(batch_size=4, close_timeout=5) as bus:
        bus.subscribe(handler, on_start=on_start, on_batch_end=on_batch_end)
        for i in range(10):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            await bus.drain()
        for i in range(10, 13):
            bus.publish(step(i))
    assert log[0] == "start"
    assert [x for x in log if x != "flush"][1:] == list(range(13))
    assert log[-1] == "flush"
    # a flush follows a batch, never another flush or the start
    for before, after in itertools.pairwise(log):
        if after == "flush":
            assert isinstance(before, int)


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_aclose_drains_then_runs_on_close_in_the_handlers_thread_or_task(kind: str) -> None:
    where: dict[str, Any] = {}
    got: list[int] = []

    def ident() -> tuple[int, Any]:
        try:
            task = anyio.get_current_task().id
        except Exception:  # no task in a plain thread
            task = None
        return threading.get_ident(), task

    if kind == "async":

        async def handler(event: Any) -> None:
            where["handler"] = ident()
            got.append(event.step)

        async def on_close() -> None:
            where["close"] = ident()
    else:

        def handler(event: Any) -> None:
            where["handler"] = ident()
            got.append(event.step)

        def on_close() -> None:
            where["close"] = ident()

    async with ev.EventBus(close_timeout=5) as bus:
        sub = bus.subscribe(handler, on_close=on_close, name="closing")
        for i in range(5):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert await sub.aclose(timeout=WAIT)
        assert got == list(range(5))
        assert where["close"] == where["handler"]
        if kind == "def":
            assert where["close"][0] != threading.get_ident()
        bus.publish(step(5))  # after aclose: not delivered
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        assert got == list(range(5))
        assert bus.stats()["closing"].delivered == 5  # ended subscriptions stay in stats
        with anyio.fail_after(WAIT):
            assert await sub.aclose()  # idempotent
            assert await sub.wait(bus.last_seq, timeout=1)  # an ended subscription counts as done


async def test_subscription_wait_is_a_barrier_for_one_subscriber() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        gate = anyio.Event()
        slow_got: list[int] = []

        async def slow(event: Any) -> None:
            await gate.wait()
            slow_got.append(event.step)

        fast = Rec()
        sub_fast = bus.subscribe(fast)
        sub_slow = bus.subscribe(slow)
        seq = None
        for i in range(5):
            seq = bus.publish(step(i))
        assert seq is not None
        with anyio.fail_after(WAIT):
            assert await sub_fast.wait(seq, timeout=WAIT)
            assert len(fast.items) == 5
            assert not await sub_slow.wait(seq, timeout=0.05)
            assert slow_got == []
            gate.set()
            assert await sub_slow.wait(seq, timeout=WAIT)
        assert slow_got == list(range(5))


# -- isolation -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_raising_handler_logged_published_and_goes_on(
    kind: str, warnings_log: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []

    def body(event: StepEnded) -> None:
        seen.append(event.step)
        if event.step == 1:
            raise ValueError("boom at one")

    if kind == "async":

        async def boomer(event: StepEnded) -> None:
            body(event)
    else:

        def boomer(event: StepEnded) -> None:
            body(event)

    async with ev.EventBus(close_timeout=5) as bus:
        failures, sibling = Rec(), Rec()
        bus.subscribe(failures, events=(CallbackFailed,))
        bus.subscribe(boomer, events=(StepEnded,), hook_name=lambda e: "on_step_end")
        bus.subscribe(sibling, events=(StepEnded,))
        for i in range(3):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        st = bus.stats()
    assert seen == [0, 1, 2]  # went on with its next event
    assert steps_of(sibling.items) == [0, 1, 2]
    assert st["boomer"].failed == 1 and st["boomer"].delivered == 2  # counted once each
    [failed] = failures.items
    assert failed.subscriber == "boomer" and failed.hook == "on_step_end"
    assert failed.event_type == "StepEnded" and "ValueError: boom at one" in failed.error
    [msg] = [m for m in failure_messages(warnings_log) if m.startswith("callback failed")]
    assert "callback failed: callback=boomer hook=on_step_end " in msg
    assert "event_type=StepEnded" in msg and "boom at one" in msg
    assert "\n" not in msg and "Traceback" not in msg  # one line; the traceback is exc_info
    [record] = [r for r in warnings_log.records if r.getMessage() == msg]
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert "Traceback (most recent call last)" in warnings_log.text  # rendered once, by the handler


async def test_hook_name_defaults_to_event_type() -> None:
    async def boom(event: Any) -> None:
        raise RuntimeError("x")

    async with ev.EventBus(close_timeout=5) as bus:
        failures = Rec()
        bus.subscribe(failures, events=(CallbackFailed,))
        bus.subscribe(boom, events=(EvalEnded,))
        bus.publish(BusTestEvalPlus(step=1, eval_name="v"))
        with anyio.fail_after(WAIT):
            await bus.drain()
    assert [(f.hook, f.event_type) for f in failures.items] == [
        ("BusTestEvalPlus", "BusTestEvalPlus")
    ]


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_failing_callback_failed_handler_publishes_nothing_more(
    kind: str, warnings_log: pytest.LogCaptureFixture
) -> None:
    # Two subscribers that fail on everything, each told about the other's failure
    # (never about its own): a failure on a CallbackFailed publishes nothing more.
    calls: dict[str, list[str]] = {"first": [], "second": []}

    def make(name: str) -> Any:
        def body(event: Event) -> None:
            calls[name].append(type(event).__name__)
            raise RuntimeError("fails on everything")

        async def async_handler(event: Event) -> None:
            body(event)

        def def_handler(event: Event) -> None:
            body(event)

        return async_handler if kind == "async" else def_handler

    async with ev.EventBus(close_timeout=5) as bus:
        watcher = Rec()
        bus.subscribe(watcher, events=(CallbackFailed,))
        bus.subscribe(make("first"), name="first")
        bus.subscribe(make("second"), name="second")
        bus.publish(ping(1))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        st = bus.stats()
    assert calls == {
        "first": ["BusTestPing", "CallbackFailed"],
        "second": ["BusTestPing", "CallbackFailed"],
    }
    assert sorted((f.subscriber, f.event_type) for f in watcher.items) == [
        ("first", "BusTestPing"),
        ("second", "BusTestPing"),
    ]
    assert st["first"].failed == st["second"].failed == 2
    assert len([m for m in failure_messages(warnings_log) if "callback failed" in m]) == 4


async def test_a_subscriber_is_never_told_about_its_own_failure() -> None:
    got: list[Event] = []

    async def boom(event: Event) -> None:
        got.append(event)
        if isinstance(event, BusTestPing):
            raise RuntimeError("x")

    async with ev.EventBus(close_timeout=5) as bus:
        other = Rec()
        bus.subscribe(boom)
        bus.subscribe(other, events=(CallbackFailed,))
        bus.publish(ping(0))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert got == [got[0]] and isinstance(got[0], BusTestPing)
    assert [f.subscriber for f in other.items] == ["boom"]


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_failing_flush_of_a_failure_watcher_does_not_storm(kind: str) -> None:
    # rule 7: a failure while handling CallbackFailed publishes nothing more. A
    # subscriber that sees CallbackFailed and whose on_batch_end (a callback's
    # flush) raises must not turn each CallbackFailed into a batch, a failure and
    # a new CallbackFailed, forever.
    flushes = 0

    def flush_body() -> None:
        nonlocal flushes
        flushes += 1
        raise OSError("disk full")

    if kind == "async":

        async def flush() -> None:
            flush_body()

        async def handler(event: Event) -> None:
            pass
    else:

        def flush() -> None:
            flush_body()

        def handler(event: Event) -> None:
            pass

    async with ev.EventBus(close_timeout=2) as bus:
        sub = bus.subscribe(handler, on_batch_end=flush)
        bus.publish(ping(1))
        with anyio.fail_after(WAIT):
            report = await bus.drain(timeout=1.0)
            st = bus.stats()["handler"]
            await sub.aclose(timeout=2)  # ends a storm, if any, so the block can be left
    assert report.ok
    assert flushes <= 3 and st.failed <= 3


async def test_slow_async_handler_stalls_no_sibling() -> None:
    n = 200
    gate = anyio.Event()
    slow_got: list[int] = []

    async def slow(event: StepEnded) -> None:
        await gate.wait()
        slow_got.append(event.step)

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(slow)
        sib_async, sib_def = Rec(), SyncRec()
        bus.subscribe(sib_async)
        bus.subscribe(sib_def)
        for i in range(n):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            report = await bus.drain(timeout=0.2)
            assert set(report.pending) == {"slow"}
            st = bus.stats()
            assert st["Rec"].delivered == st["SyncRec"].delivered == n
            assert st["slow"].delivered == 0 and slow_got == []
            gate.set()
            assert (await bus.drain()).ok
    assert slow_got == list(range(n))
    assert steps_of(sib_async.items) == steps_of(sib_def.items) == list(range(n))


async def test_blocking_def_handler_stalls_neither_publisher_nor_siblings() -> None:
    n = 200
    release, entered = threading.Event(), threading.Event()
    blocked_got: list[int] = []

    def blocking(event: StepEnded) -> None:
        entered.set()
        release.wait()  # blocking I/O stand-in: holds its own thread only
        blocked_got.append(event.step)

    async with ev.EventBus(close_timeout=5) as bus:
        try:
            bus.subscribe(blocking)
            sib_async, sib_def = Rec(), SyncRec()
            bus.subscribe(sib_async)
            bus.subscribe(sib_def)
            bus.publish(step(0))
            await thread_wait(entered)  # the handler holds its thread from here on
            for i in range(1, n):
                bus.publish(step(i))  # the publisher finishes its work meanwhile
            with anyio.fail_after(WAIT):
                report = await bus.drain(timeout=0.2)
                assert not report.ok and set(report.pending) == {"blocking"}
                st = bus.stats()
                assert st["Rec"].delivered == st["SyncRec"].delivered == n
                assert st["blocking"].delivered == 0 and blocked_got == []
                assert st["blocking"].pending == n  # in its hands or waiting: not handled
        finally:
            release.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert blocked_got == list(range(n))
    assert steps_of(sib_async.items) == steps_of(sib_def.items) == list(range(n))


async def test_hanging_async_handler_cancelled_at_timeout(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    got: list[int] = []
    cancelled: list[int] = []

    async def hangs_on_one(event: StepEnded) -> None:
        if event.step == 1:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled.append(event.step)
                raise
        got.append(event.step)

    async with ev.EventBus(close_timeout=5) as bus:
        failures, sibling = Rec(), Rec()
        bus.subscribe(failures, events=(CallbackFailed,))
        bus.subscribe(hangs_on_one, events=(StepEnded,), timeout=0.05)
        bus.subscribe(sibling, events=(StepEnded,))
        for i in range(3):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            await sibling.reached(3)  # not held up by the hanging one
            assert (await bus.drain()).ok
        st = bus.stats()["hangs_on_one"]
    assert got == [0, 2] and cancelled == [1]
    assert st.failed == 1 and st.delivered == 2
    [failed] = failures.items
    assert failed.subscriber == "hangs_on_one" and "timeout" in failed.error
    assert any("hook=StepEnded" in m and "timeout" in m for m in failure_messages(warnings_log))


async def test_hanging_def_handler_abandoned_not_waited_for_and_order_holds() -> None:
    release = threading.Event()
    calls: list[tuple[str, int]] = []

    def hangs_on_zero(event: StepEnded) -> None:
        calls.append(("start", event.step))
        if event.step == 0:
            release.wait()
        calls.append(("end", event.step))

    async with ev.EventBus(close_timeout=5) as bus:
        try:
            failures = Rec()
            bus.subscribe(failures, events=(CallbackFailed,))
            sub = bus.subscribe(hangs_on_zero, events=(StepEnded,), timeout=0.1)
            bus.publish(step(0))
            bus.publish(step(1))
            with anyio.fail_after(WAIT):
                report = await bus.drain(timeout=WAIT)  # returns at the handler's timeout
                assert report.ok and report.stuck == ("hangs_on_zero",)
                assert sub.stuck
                report = await bus.publish_and_wait(step(2), timeout=WAIT)
                assert report.ok and report.stuck == ("hangs_on_zero",)
                assert (await bus.drain()).ok  # the CallbackFailed reached its watcher
            assert calls == [("start", 0)]  # its next call waits for the hung one
            assert bus.stats()["hangs_on_zero"].failed == 1
            [failed] = failures.items
            assert failed.event_type == "StepEnded" and "timeout" in failed.error
        finally:
            release.set()
        with anyio.fail_after(WAIT):
            while sub.stuck:  # a stuck handler is not waited for (rule 8): let it return
                await anyio.sleep(0.001)
            assert await sub.aclose(timeout=WAIT)  # waits for its thread to finish
        assert not sub.stuck
        # order held, and the wait for the hung call did not count against the next ones
        assert calls == [
            ("start", 0),
            ("end", 0),
            ("start", 1),
            ("end", 1),
            ("start", 2),
            ("end", 2),
        ]
        assert bus.stats()["hangs_on_zero"].failed == 1


async def test_def_timeout_detected_when_the_pump_started_the_call() -> None:
    # The pump's own tick hands the batch to the thread (the batch delay passed, no
    # barrier waiting); nobody arms a timer for the call's timeout, so a later drain
    # sleeps until its own deadline instead of returning at the handler's timeout.
    release, entered = threading.Event(), threading.Event()

    def hangs(event: Any) -> None:
        entered.set()
        release.wait()

    async with ev.EventBus(close_timeout=5) as bus:
        try:
            sub = bus.subscribe(hangs, timeout=0.1)
            bus.publish(ping(0))
            await thread_wait(entered)  # started by the pump, not by a barrier
            with anyio.fail_after(5):
                report = await bus.drain(timeout=30)
            assert report.ok and report.stuck == ("hangs",) and sub.stuck
        finally:
            release.set()


async def test_def_call_in_flight_with_a_timeout_does_not_delay_siblings() -> None:
    # A def handler with timeout=30 is in a call: the pump's timer is armed for its
    # deadline 30 s out, and publish() then trusts that timer to deliver new events.
    release, entered = threading.Event(), threading.Event()

    def busy(event: Any) -> None:
        entered.set()
        release.wait()

    async with ev.EventBus(close_timeout=5) as bus:
        try:
            bus.subscribe(busy, events=(StepEnded,), timeout=30)
            sibling = Rec()
            bus.subscribe(sibling, events=(BusTestPing,))
            bus.publish(step(0))
            await thread_wait(entered)
            with anyio.fail_after(5):
                for i in range(3):
                    bus.publish(ping(i))
                    await sibling.reached(i + 1)  # no barrier: the bus delivers on its own
        finally:
            release.set()


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


# -- policies on the bus -------------------------------------------------------------


async def test_latest_coalesces_steps_keeps_rare_events_and_counts() -> None:
    gate, entered = anyio.Event(), anyio.Event()
    got: list[Event] = []

    async def progress(event: Event) -> None:
        got.append(event)
        entered.set()
        await gate.wait()

    async with ev.EventBus(lag_threshold=10_000, close_timeout=5) as bus:
        bus.subscribe(progress, policy=ev.Latest(max_kept=2), events=(StepEnded, EvalEnded))
        first = step(0)
        bus.publish(first)
        with anyio.fail_after(WAIT):
            await entered.wait()  # holding step 0
        published = [
            step(1, "a"),
            EvalEnded(step=1, eval_name="e1"),
            step(2, "a"),
            step(1, "b"),
            EvalEnded(step=2, eval_name="e2"),
            EvalEnded(step=3, eval_name="e3"),  # max_kept=2: e1 goes
            step(3, "a"),
        ]
        for e in published:
            bus.publish(e)
        st = bus.stats()["progress"]
        assert st.pending == 5 and st.dropped == 3  # 4 kept + step 0 in its hands
        assert st.coalesced == 2  # steps 1a and 2a replaced; e1 was forced out by max_kept
        gate.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        st = bus.stats()["progress"]
    # steps 1a and 2a were replaced (3a took its own place), e1 fell past max_kept
    assert got == [first, published[3], published[4], published[5], published[6]]
    assert st.dropped == 3 and st.delivered == 5 and st.max_pending <= 4


async def test_drop_oldest_bound_counts_and_lag_reports_at_doublings() -> None:
    gate, entered = anyio.Event(), anyio.Event()
    got: list[int] = []

    async def windowed(event: StepEnded) -> None:
        got.append(event.step)
        entered.set()
        await gate.wait()

    async with ev.EventBus(lag_threshold=10_000, close_timeout=5) as bus:
        lagged = Rec()
        bus.subscribe(lagged, events=(SubscriberLagged,))
        bus.subscribe(windowed, events=(StepEnded,), policy=ev.DropOldest(3))
        bus.publish(step(0))
        with anyio.fail_after(WAIT):
            await entered.wait()
        for i in range(1, 21):
            bus.publish(step(i))
            st = bus.stats()["windowed"]  # one walk per publish
            assert st.pending <= 3 + 1  # its window and the one in its hands
        assert st.dropped == 17 and st.max_pending == 3
        gate.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert got == [0, 18, 19, 20]
    reports = [(r.subscriber, r.dropped) for r in lagged.items]
    assert reports == [
        ("windowed", 1),
        ("windowed", 2),
        ("windowed", 4),
        ("windowed", 8),
        ("windowed", 16),
    ]


async def test_lossless_lag_at_threshold_and_doublings_never_to_itself() -> None:
    gate, entered = anyio.Event(), anyio.Event()
    own: list[Event] = []

    async def laggard(event: Event) -> None:
        own.append(event)
        entered.set()
        await gate.wait()

    async with ev.EventBus(lag_threshold=4, close_timeout=5) as bus:
        lagged = Rec()
        bus.subscribe(lagged, events=(SubscriberLagged,))
        bus.subscribe(laggard, events=(StepEnded, SubscriberLagged))
        bus.publish(step(0))
        with anyio.fail_after(WAIT):
            await entered.wait()
        for i in range(1, 21):
            bus.publish(step(i))
            bus.stats()  # one walk per publish
        gate.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        st = bus.stats()["laggard"]
    assert [r.pending for r in lagged.items] == [4, 8, 16]
    assert all(r.subscriber == "laggard" and r.dropped == 0 for r in lagged.items)
    assert not any(isinstance(e, SubscriberLagged) for e in own)  # never to itself
    assert steps_of(own) == list(range(21)) and st.dropped == 0


async def test_lossless_lag_jump_reports_once_per_crossing() -> None:
    # Twenty events walked at once cross 4, 8 and 16 in one go: one report with the
    # current count, not the same report at every later tick until the mark catches up.
    gate, entered = anyio.Event(), anyio.Event()

    async def laggard(event: Event) -> None:
        entered.set()
        await gate.wait()

    async with ev.EventBus(lag_threshold=4, close_timeout=5) as bus:
        lagged = Rec()
        bus.subscribe(lagged, events=(SubscriberLagged,))
        bus.subscribe(laggard, events=(StepEnded,))
        bus.publish(step(0))
        with anyio.fail_after(WAIT):
            await entered.wait()
        for i in range(1, 21):
            bus.publish(step(i))
        for _ in range(5):
            bus.stats()  # five walks, nothing new
        gate.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert [r.pending for r in lagged.items] == [20]


async def test_latest_coalescing_alone_is_not_lag() -> None:
    # rule 4: a bounded subscriber reports lag when arrivals since its last take
    # cross lag_threshold, or when max_kept/maxlen forces a drop. Replacing a
    # pending StepEnded by a newer one is what Latest is for (a progress bar).
    gate, entered = anyio.Event(), anyio.Event()

    async def bar(event: StepEnded) -> None:
        entered.set()
        await gate.wait()

    async with ev.EventBus(lag_threshold=1000, close_timeout=5) as bus:
        lagged = Rec()
        bus.subscribe(lagged, events=(SubscriberLagged,))
        bus.subscribe(bar, events=(StepEnded,), policy=ev.Latest())
        bus.publish(step(0))
        with anyio.fail_after(WAIT):
            await entered.wait()
        for i in range(1, 10):
            bus.publish(step(i))
            bus.stats()
        gate.set()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        assert bus.stats()["bar"].dropped == 8
    assert lagged.items == []


@pytest.mark.parametrize("policy", [ev.DropOldest(8), ev.Latest(max_kept=8)], ids=repr)
async def test_memory_bounded_under_a_stuck_bounded_subscriber(policy: ev.Policy) -> None:
    release, entered = threading.Event(), threading.Event()

    def stuck(event: Event) -> None:
        entered.set()
        release.wait()

    async with ev.EventBus(close_timeout=5) as bus:
        try:
            bus.subscribe(stuck, policy=policy, events=(EvalEnded, StepEnded))
            bus.publish(step(0))
            await thread_wait(entered)
            for i in range(1, 5000):
                bus.publish(EvalEnded(step=i, eval_name="v") if i % 2 else step(i))
                if i % 100 == 0:
                    # 8 kept (+ 1 step for Latest) + 1 in its hands
                    assert bus.stats()["stuck"].pending <= 10
                    await checkpoint()
            st = bus.stats()["stuck"]
            assert st.pending <= 10 and st.max_pending <= 9
            assert st.dropped == 5000 - st.pending  # every event is kept, in its hands or dropped
        finally:
            release.set()


# -- drain (rule 1) ------------------------------------------------------------------


async def test_drain_returns_a_report_and_does_not_raise_on_deadline() -> None:
    gate = anyio.Event()

    async def held(event: Any) -> None:
        await gate.wait()

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(held)
        bus.subscribe(Rec())
        for i in range(3):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            report = await bus.drain(timeout=0.05)
        assert isinstance(report, ev.DrainReport)
        gate.set()
        assert not report.ok and set(report.pending) == {"held"} and report.stuck == ()
        assert report.pending["held"] >= 1
        with anyio.fail_after(WAIT):
            report = await bus.drain(timeout=None)
        assert report.ok and report.pending == {}


async def test_drain_includes_events_published_while_it_waits() -> None:
    async def chain(event: BusTestPing) -> None:
        await checkpoint()
        if event.n < 20:
            bus.publish(ping(event.n + 1))

    def chain_sync(event: StepEnded) -> None:
        if event.step < 20:
            bus.publish(step(event.step + 1))  # from its thread

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(chain, events=(BusTestPing,))
        bus.subscribe(chain_sync, events=(StepEnded,))
        everything = Rec()
        bus.subscribe(everything)
        bus.publish(ping(0))
        bus.publish(step(0))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        got = list(everything.items)
    assert [e.n for e in got if isinstance(e, BusTestPing)] == list(range(21))
    assert steps_of(got) == list(range(21))


async def test_drain_and_publish_and_wait_inside_an_async_handler_skip_the_caller() -> None:
    reports: list[ev.DrainReport] = []
    seen_by_other_at_drain: list[int] = []

    async def other(event: Any) -> None:
        await checkpoint()
        other_got.append(event)

    other_got: list[Any] = []

    async def drainer(event: StepEnded) -> None:
        if event.step == 5:
            reports.append(await bus.drain(timeout=WAIT))
            seen_by_other_at_drain.append(len(steps_of(other_got)))
            reports.append(await bus.publish_and_wait(step(100), timeout=WAIT))

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(other, events=(StepEnded,))
        bus.subscribe(drainer, events=(StepEnded,))
        for i in range(10):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
    assert [r.ok for r in reports] == [True, True]
    assert seen_by_other_at_drain == [10]
    assert 100 in steps_of(other_got)


async def test_drain_inside_a_def_handler_skips_the_caller() -> None:
    # rule 18: called from inside a handler, drain and publish_and_wait do not wait
    # for the calling subscriber. A def handler reaches them through
    # anyio.from_thread.run; waiting for itself would block until the timeout.
    reports: list[ev.DrainReport] = []

    async with ev.EventBus(close_timeout=5) as bus:
        token = anyio.lowlevel.current_token()

        def drainer(event: StepEnded) -> None:
            if event.step == 1:
                reports.append(anyio.from_thread.run(bus.drain, 1.0, token=token))

        bus.subscribe(drainer, events=(StepEnded,))
        bus.subscribe(Rec())
        for i in range(3):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            await bus.drain()
    [report] = reports
    assert report.ok, report


async def test_drain_waits_for_an_async_subscribers_flush() -> None:
    # A def subscriber counts as done after on_batch_end (its thread marks the batch
    # done after the flush); an async one must too: drain/publish_and_wait are how
    # tests and the loop know a logger's file holds an event.
    gate = anyio.Event()
    flushed: list[int] = []
    got: list[int] = []

    async def handler(event: StepEnded) -> None:
        got.append(event.step)

    async def flush() -> None:
        await gate.wait()
        flushed.append(len(got))

    async with ev.EventBus(close_timeout=5) as bus:
        bus.subscribe(handler, on_batch_end=flush, events=(StepEnded,))
        with anyio.fail_after(WAIT):
            report = await bus.publish_and_wait(step(0), timeout=0.2)
            assert got == [0]
            assert not report.ok and flushed == []
            report = await bus.drain(timeout=0.2)
            assert not report.ok
            gate.set()
            assert (await bus.drain()).ok
    assert flushed == [1]


# -- publish_and_wait ----------------------------------------------------------------


async def test_publish_and_wait_is_a_barrier_and_names_who_had_not() -> None:
    gate = anyio.Event()

    async def held(event: Any) -> None:
        await gate.wait()

    async with ev.EventBus(close_timeout=5) as bus:
        fast_a, fast_d = Rec(), SyncRec()
        bus.subscribe(fast_a, events=(StepEnded,))
        bus.subscribe(fast_d, events=(StepEnded,))
        with anyio.fail_after(WAIT):
            report = await bus.publish_and_wait(step(0), timeout=WAIT)
            assert report.ok and report.pending == {}
            assert steps_of(fast_a.items) == steps_of(fast_d.items) == [0]
            bus.subscribe(held, events=(StepEnded,))
            bus.subscribe(Rec(), events=(EvalEnded,), name="never-matches")
            report = await bus.publish_and_wait(step(1), timeout=0.1)
            assert not report.ok and report.pending == {"held": 1}
            assert steps_of(fast_a.items) == steps_of(fast_d.items) == [0, 1]
            gate.set()
            report = await bus.publish_and_wait(step(2))
            assert report.ok


async def test_publish_rejects_non_events() -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        with pytest.raises(TypeError):
            bus.publish("not an event")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await bus.publish_and_wait("not an event")  # type: ignore[arg-type]
        await checkpoint()


# -- close (rule 1) ------------------------------------------------------------------


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

    with pytest.raises(KeyError, match="mine"):
        await body()
    assert steps_of(got.items) == list(range(50))


async def test_publish_after_close_counted_and_logged_once(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    async with ev.EventBus(close_timeout=5) as bus:
        got = Rec()
        bus.subscribe(got)
    assert bus.publish(step(0)) is None  # never raises
    bus.publish(step(1))
    await anyio.to_thread.run_sync(bus.publish, step(2))
    assert bus.dropped_after_close == 3
    assert got.items == []
    assert len([m for m in failure_messages(warnings_log) if "after the bus closed" in m]) == 1


# -- publishing from handlers --------------------------------------------------------


async def test_publish_from_async_and_def_handlers() -> None:
    returned: list[Any] = []

    async def a(event: BusTestPing) -> None:
        returned.append(("async", bus.publish(step(event.n))))

    def d(event: BusTestPing) -> None:
        returned.append(("def", bus.publish(EvalEnded(step=event.n, eval_name="from-def"))))

    async with ev.EventBus(close_timeout=5) as bus:
        everything = Rec()
        bus.subscribe(a, events=(BusTestPing,))
        bus.subscribe(d, events=(BusTestPing,))
        bus.subscribe(everything, envelopes=True)
        with anyio.fail_after(WAIT):
            for i in range(5):
                await bus.publish_and_wait(ping(i))
            assert (await bus.drain()).ok
    kinds = [type(e.event).__name__ for e in everything.items]
    assert kinds.count("StepEnded") == kinds.count("EvalEnded") == 5
    assert all(isinstance(seq, int) for kind, seq in returned if kind == "async")
    assert all(seq is None for kind, seq in returned if kind == "def")  # from its thread
    seqs = [e.seq for e in everything.items]
    assert seqs == sorted(seqs) == list(range(len(seqs)))


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


@pytest.mark.anyio
async def test_events_that_arrive_while_an_async_handler_is_busy_are_delivered() -> None:
    """No later publish, no drain: the bus itself comes back for them."""
    gate, done = anyio.Event(), anyio.Event()
    seen: list[int] = []
    async with ev.EventBus(close_timeout=5) as bus:

        async def handler(event: StepEnded) -> None:
            if event.step == 0:
                await gate.wait()
            seen.append(event.step)
            if event.step == 2:
                done.set()

        bus.subscribe(handler, events=(StepEnded,))
        bus.publish(StepEnded(step=0, num_steps=3))
        await bus.publish_and_wait(StepEnded(step=99, num_steps=3), timeout=0.01)  # handler busy
        bus.publish(StepEnded(step=1, num_steps=3))
        bus.publish(StepEnded(step=2, num_steps=3))
        gate.set()
        with anyio.fail_after(5):
            await done.wait()
    assert seen == [0, 99, 1, 2]  # all delivered, in publish order


@pytest.mark.anyio
async def test_a_def_handler_hanging_in_its_last_batch_is_abandoned_at_its_timeout() -> None:
    """aclose and close stop waiting once the handler is past its timeout (rule 8)."""
    release = threading.Event()
    closed = threading.Event()
    async with ev.EventBus(close_timeout=60) as bus:

        def hangs(event: StepEnded) -> None:
            release.wait(60)

        sub = bus.subscribe(hangs, events=(StepEnded,), timeout=0.1, on_close=closed.set)
        bus.publish(StepEnded(step=0, num_steps=1))  # still in the buffer: the last batch
        with anyio.fail_after(20):  # far below close_timeout and the aclose deadline
            assert not await sub.aclose(timeout=60)
        assert sub.stuck
        assert sub.stats().failed == 1
        assert not closed.is_set()
        release.set()
    with anyio.fail_after(20):
        while not closed.is_set():  # on_close runs in its thread once the call returns
            await anyio.sleep(0.01)


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
