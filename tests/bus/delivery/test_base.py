"""What both deliveries (``bus/_delivery/``: a task or a thread) promise alike.

Each test runs with an ``async def`` handler and with a ``def`` one: the
subscription's hooks run around batches; a handler that raises is logged once
(one line, the traceback as ``exc_info``), announced with ``CallbackFailed``,
counted, and goes on with its next event; a failure over a ``CallbackFailed``
announces nothing more.
"""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.lowlevel import checkpoint

import evsys_async as ev
from evsys_async.events import (
    CallbackFailed,
    EvalEnded,
    Event,
    StepEnded,
)
from tests.bus.helpers import (
    WAIT,
    BusTestEvalPlus,
    Rec,
    failure_messages,
    ping,
    step,
    steps_of,
)

pytestmark = pytest.mark.anyio


# -- the subscription's hooks ------------------------------------------------------


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


# -- failures ----------------------------------------------------------------------


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


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_failing_flush_of_a_failure_watcher_does_not_storm(kind: str) -> None:
    # A failure while handling CallbackFailed publishes nothing more. A
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
