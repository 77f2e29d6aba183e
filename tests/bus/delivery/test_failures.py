"""Failing is cheap (``bus/_delivery/failures.py``): the first failure of each kind is
told in full, later ones are counted and told in summaries, and a subscriber can be
disabled for good (``requires_start``, ``max_consecutive_failures``).

Each async test runs with an ``async def`` handler and a ``def`` one, on asyncio and
trio. Everything is counted: log records, ``CallbackFailed`` events and their
``count``, the subscriber's stats, the calls a failure's text would need.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.bus._delivery import failures
from evsys_async.events import CallbackFailed, StepEnded
from tests.bus.helpers import WAIT, Rec, failure_messages, step

pytestmark = pytest.mark.anyio

KINDS = ["async", "def"]


def handler_of(kind: str, body: Callable[[Any], None]) -> Callable[[Any], Any]:
    if kind == "def":
        return body

    async def handler(event: Any) -> None:
        body(event)

    return handler


def hook_of(kind: str, body: Callable[[], None]) -> Callable[[], Any]:
    if kind == "def":
        return body

    async def hook() -> None:
        body()

    return hook


class Loud(RuntimeError):
    """Counts how often its text is made: a failure that is not told costs none."""

    texts = 0

    def __str__(self) -> str:
        Loud.texts += 1
        return "server down"


def told(caplog: pytest.LogCaptureFixture) -> tuple[list[logging.LogRecord], list[str]]:
    """The first-failure records (with their traceback) and the summary lines."""
    firsts = [
        r
        for r in caplog.records
        if r.name == "evsys_async" and r.getMessage().startswith("callback failed")
    ]
    summaries = [m for m in failure_messages(caplog) if " more " in m]
    return firsts, summaries


@pytest.mark.parametrize("kind", KINDS)
async def test_a_handler_failing_on_every_event_is_told_once_then_summed(
    kind: str, warnings_log: pytest.LogCaptureFixture
) -> None:
    Loud.texts = 0
    n = 2000

    def body(event: Any) -> None:
        raise Loud

    async with ev.EventBus(close_timeout=5) as bus:
        watcher = Rec()
        bus.subscribe(watcher, events=(CallbackFailed,))
        sub = bus.subscribe(handler_of(kind, body), events=(StepEnded,), name="csv_metrics")
        for i in range(n):
            bus.publish(step(i))
            if i % 100 == 0:
                await anyio.lowlevel.checkpoint()
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok  # quiet, then what no summary told is told
        st = sub.stats()
    assert (st.delivered, st.failed, st.dropped, st.pending) == (0, n, 0, 0)
    firsts, summaries = told(warnings_log)
    [first] = firsts  # the first in full: one line, the traceback as exc_info
    assert (
        "callback=csv_metrics" in first.getMessage() and "Loud: server down" in first.getMessage()
    )
    assert first.exc_info is not None and first.exc_info[0] is Loud
    assert 1 <= len(summaries) <= 3  # the drain's, and at most a timed one or two
    pattern = (
        r"csv_metrics: ([\d,]+) more Loud in StepEnded since \d\d:\d\d:\d\d \(([\d,]+) in all\)"
    )
    more = [re.fullmatch(pattern, m) for m in summaries]
    assert all(more), summaries
    assert 1 + sum(int(m.group(1).replace(",", "")) for m in more if m) == n
    # CallbackFailed is coalesced the same way: its counts add up to every failure
    assert sum(e.count for e in watcher.items) == n
    assert watcher.items[0].count == 1 and watcher.items[0].error == "Loud: server down"
    assert all(e.error == "Loud: server down" for e in watcher.items)
    assert len(watcher.items) == 1 + len(summaries)
    # the first failure's line, and its traceback's last line as the log renders it;
    # nothing at all for the 1,999 others
    assert Loud.texts == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_each_kind_of_failure_is_told_in_full_once(
    kind: str, warnings_log: pytest.LogCaptureFixture
) -> None:
    errors = [ValueError, KeyError, ValueError, KeyError, ValueError]

    def body(event: Any) -> None:
        raise errors[event.step]("bad")

    async with ev.EventBus(close_timeout=5) as bus:
        watcher = Rec()
        bus.subscribe(watcher, events=(CallbackFailed,))
        sub = bus.subscribe(handler_of(kind, body), events=(StepEnded,), name="cb")
        for i in range(len(errors)):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        await sub.aclose(WAIT)
    firsts, summaries = told(warnings_log)
    assert sorted(r.exc_info[0].__name__ for r in firsts if r.exc_info) == [
        "KeyError",
        "ValueError",
    ]
    assert sorted(summaries) == [
        m for m in sorted(summaries) if re.match(r"cb: [12] more (KeyError|ValueError)", m)
    ]
    by_kind: dict[str, int] = {}
    for e in watcher.items:
        by_kind[e.error.split(":")[0]] = by_kind.get(e.error.split(":")[0], 0) + e.count
    assert by_kind == {"ValueError": 3, "KeyError": 2}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_failing_flush_is_counted_by_hook_and_coalesced(
    kind: str, warnings_log: pytest.LogCaptureFixture
) -> None:
    def flush() -> None:
        raise OSError("disk full")

    async with ev.EventBus(close_timeout=5) as bus:
        watcher = Rec()
        bus.subscribe(watcher, events=(CallbackFailed,))
        names = {"on_batch_end": "flush", "on_start": "setup", "on_close": "teardown"}
        sub = bus.subscribe(
            handler_of(kind, lambda e: None),
            events=(StepEnded,),
            name="writer",
            on_batch_end=hook_of(kind, flush),
            hook_name=lambda e: names[e] if isinstance(e, str) else "on_step_end",
        )
        for i in range(200):
            bus.publish(step(i))
            with anyio.fail_after(WAIT):
                await bus.drain()  # one batch, one flush, one failure each time
        st = sub.stats()
        await sub.aclose(WAIT)
    assert st.delivered == 200 and st.failed == 0
    assert st.hook_failures == st.failed_hooks["flush"] >= 200
    firsts, _ = told(warnings_log)
    assert len(firsts) == 1 and "hook=flush" in firsts[0].getMessage()
    assert sum(e.count for e in watcher.items if e.subscriber == "writer") == st.hook_failures
    assert {e.hook for e in watcher.items} == {"flush"}


async def test_a_failure_over_callback_failed_is_counted_and_logged_never_announced(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    seen: list[str] = []

    async def fails_on_everything(event: Any) -> None:
        seen.append(type(event).__name__)
        raise RuntimeError("no")

    async with ev.EventBus(close_timeout=5) as bus:
        watcher = Rec()
        bus.subscribe(watcher, events=(CallbackFailed,))
        bus.subscribe(fails_on_everything, name="a")
        bus.subscribe(fails_on_everything, name="b")
        for i in range(50):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        st = bus.stats()
    # each is told of the other's failures (never its own); failing on those announces
    # nothing, so the storm stops after one round
    announced = {name: sum(e.count for e in watcher.items if e.subscriber == name) for name in "ab"}
    assert announced == {"a": 50, "b": 50}  # the StepEnded failures
    on_failed = {name: st[name].failed - 50 for name in "ab"}
    assert on_failed == {
        "a": seen.count("CallbackFailed") // 2,
        "b": seen.count("CallbackFailed") // 2,
    }


def test_summaries_come_at_growing_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock is the book's own: a fake one moves it, nothing sleeps."""
    now = [100.0]
    monkeypatch.setattr(failures.time, "monotonic", lambda: now[0])
    told_again: list[tuple[int, int]] = []

    class Subject:
        def label(self, event: Any, slot: str) -> str:
            return "on_step_end"

        def describe(self, exc: BaseException) -> str:
            return f"{type(exc).__name__}: {exc}"

        def tell_first(
            self, event: Any, exc: Any, slot: str, quiet: bool, kind: failures.Kind
        ) -> None:
            told_again.append((1, 1))

        def tell_again(self, kind: failures.Kind, more: int, loud: int, since: float) -> None:
            told_again.append((more, loud))

    book = failures.FailureBook(Subject())
    event = step(0)

    def fail(times: int, at: float) -> None:
        now[0] = at
        for _ in range(times):
            book.record(event, RuntimeError("x"), "", False)

    fail(10, 100.0)  # the first told, 9 counted
    fail(5, 100.9)  # before the first summary is due (1 s)
    assert told_again == [(1, 1)]
    fail(1, 101.0)  # due: 15 told at once
    fail(3, 102.5)  # the next gap is 2 s
    fail(1, 103.0)  # due again
    fail(7, 106.0)  # then 4 s: not yet
    assert told_again == [(1, 1), (15, 15), (4, 4)]
    assert book.flush()  # at a drain or the end: the rest
    assert told_again[-1] == (7, 7) and not book.flush()
    assert sum(m for m, _ in told_again) == 10 + 5 + 1 + 3 + 1 + 7


@pytest.mark.parametrize("kind", KINDS)
async def test_requires_start_disables_a_subscriber_whose_on_start_failed(kind: str) -> None:
    calls: list[int] = []
    closed: list[bool] = []

    def start() -> None:
        raise ConnectionError("refused")

    async with ev.EventBus(close_timeout=5) as bus:
        sub = bus.subscribe(
            handler_of(kind, lambda e: calls.append(e.step)),
            events=(StepEnded,),
            name="client",
            on_start=hook_of(kind, start),
            on_close=hook_of(kind, lambda: closed.append(True)),
            requires_start=True,
        )
        plain = bus.subscribe(
            handler_of(kind, lambda e: None),
            events=(StepEnded,),
            on_start=hook_of(kind, start),  # no requires_start: today's behaviour
        )
        for i in range(20):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        st, st_plain = sub.stats(), plain.stats()
        assert await sub.aclose(WAIT)
    assert calls == []  # never on the half-built object
    assert closed == [True]  # on_close still runs: it releases what on_start opened
    assert (st.delivered, st.failed, st.dropped, st.pending) == (0, 0, 20, 0)
    assert st.disabled == "on_start failed: ConnectionError: refused"
    assert st.failed_hooks == {"on_start": 1} and st.hook_failures == 1
    assert (st_plain.delivered, st_plain.disabled) == (20, None)


@pytest.mark.parametrize("kind", KINDS)
async def test_max_consecutive_failures_disables_after_that_many_in_a_row(
    kind: str, warnings_log: pytest.LogCaptureFixture
) -> None:
    fails_at = {2, 3, 5, 6, 7}  # 2,3 then a success: the streak starts over
    calls: list[int] = []

    def body(event: Any) -> None:
        calls.append(event.step)
        if event.step in fails_at:
            raise TimeoutError("server")

    async with ev.EventBus(close_timeout=5) as bus:
        sub = bus.subscribe(
            handler_of(kind, body), events=(StepEnded,), name="c", max_consecutive_failures=3
        )
        for i in range(30):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        for i in range(30, 40):  # later batches: dropped without a call
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        st = sub.stats()
    assert calls == list(range(8))
    assert (st.delivered, st.failed, st.dropped, st.pending) == (3, 5, 32, 0)
    assert st.disabled == "3 failures in a row (the last: TimeoutError: server)"
    [line] = [m for m in failure_messages(warnings_log) if "disabled" in m]
    assert "callback=c" in line and "3 failures in a row" in line


async def test_max_consecutive_failures_must_be_at_least_one() -> None:
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            for bad in (0, -1, 1.5, True):
                with pytest.raises(ValueError, match="max_consecutive_failures"):
                    bus.subscribe(Rec(), max_consecutive_failures=bad)  # type: ignore[arg-type]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


@pytest.mark.parametrize("kind", KINDS)
async def test_an_exception_whose_text_fails_is_still_one_failure(kind: str) -> None:
    def body(event: Any) -> None:
        raise Unprintable

    async with ev.EventBus(close_timeout=5) as bus:
        watcher = Rec()
        bus.subscribe(watcher, events=(CallbackFailed,))
        sub = bus.subscribe(handler_of(kind, body), events=(StepEnded,))
        for i in range(5):
            bus.publish(step(i))
        with anyio.fail_after(WAIT):
            assert (await bus.drain()).ok
        st = sub.stats()
    assert (st.delivered, st.failed, st.pending) == (0, 5, 0)  # its thread or task lives on
    assert watcher.items[0].error == "Unprintable: (its message could not be made)"
