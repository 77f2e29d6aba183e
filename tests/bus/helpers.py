"""What the bus tests share: test events, recording handlers, and waits that never block.

Isolation is proven by counting, never by a clock: a blocked handler waits on
an ``anyio.Event`` or a ``threading.Event`` while a test checks what its
siblings received. The only clocks are handler ``timeout``s (which is what
those tests test) and the ``fail_after`` around every wait.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio
import pytest

from evsys_async.events import Envelope, EvalEnded, Event, StepEnded

#: the fail_after around every wait: generous, never reached when all is well
WAIT = 10.0


class BusTestPing(Event):
    n: int = 0


class BusTestEvalPlus(EvalEnded):
    """A user subclass of a built-in event."""


class ThrTestMsg(Event):
    """An event that says which publisher (thread) sent it, and its index there."""

    source: str
    i: int


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


class Counter:
    """An async handler; ``done`` is set once ``goal`` events arrived."""

    def __init__(self, goal: int) -> None:
        self.items: list[Any] = []
        self.goal = goal
        self.done = anyio.Event()

    async def __call__(self, event: Any) -> None:
        self.items.append(event)
        if len(self.items) >= self.goal:
            self.done.set()


class SyncCounter:
    """A ``def`` handler that records what it gets."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    def __call__(self, event: Any) -> None:
        self.items.append(event)


async def thread_wait(evt: threading.Event, timeout: float = WAIT) -> None:
    """Wait for a ``threading.Event`` without blocking the loop (no bus barrier involved)."""
    assert await anyio.to_thread.run_sync(evt.wait, timeout), "threading.Event never set"


def steps_of(items: list[Any]) -> list[int]:
    return [e.step for e in items if isinstance(e, StepEnded)]


def by_source(items: list[Any]) -> dict[str, list[int]]:
    """``ThrTestMsg`` indices (events or envelopes) grouped by their publisher."""
    out: dict[str, list[int]] = {}
    for e in items:
        event = e.event if isinstance(e, Envelope) else e
        out.setdefault(event.source, []).append(event.i)
    return out


def failure_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "evsys_async" and r.levelno == logging.WARNING
    ]
