"""Subscription: one subscriber's handler, policy, buffer and counters.

The bus (``bus.py``) owns the mechanics — the pump, the wakes, the threads;
this module holds what a caller gets back from ``subscribe`` and the records
it reads: :class:`SubscriberStats` and :class:`DrainReport`.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import msgspec

from ._worker import Outcome
from .errors import BusClosedError
from .events import CallbackFailed, Event, SubscriberLagged
from .policies import DropOldest, Entry, Latest, Policy

if TYPE_CHECKING:
    from .bus import EventBus

__all__ = [
    "DrainReport",
    "SubscriberStats",
    "Subscription",
    "current_subscription",
    "is_async_callable",
]

T = TypeVar("T")

Handler = Callable[[Any], Any]
Hook = Callable[[], Any]

_thread_local = threading.local()
#: what a def subscriber's thread takes: a batch and its end, a call, or None (end)
_ThreadItem = tuple[list[Entry], int] | Outcome | None
_current_subscription: contextvars.ContextVar[Subscription | None] = contextvars.ContextVar(
    "evsys_current_subscription", default=None
)


class SubscriberStats(msgspec.Struct, frozen=True):
    """Counts for one subscriber, current at the call of ``EventBus.stats()``.

    Every matching event is counted once: ``delivered`` (its handler
    returned) + ``failed`` (it raised or timed out) + ``dropped`` (by the
    policy, or never reachable because a ``def`` handler is stuck past its
    timeout) + ``pending`` (in the buffer, or taken and not yet handled).
    ``coalesced`` is the part of ``dropped`` that ``Latest`` replaced by design;
    ``hook_failures`` counts failed ``on_start``/``on_batch_end``/``on_close``
    calls, which are not events.
    """

    delivered: int
    pending: int
    dropped: int
    failed: int
    max_pending: int
    handler_seconds: float
    #: the part of ``dropped`` that a ``Latest`` policy coalesced by design (a newer
    #: level-like event replaced a pending one), as opposed to drops forced by a bound
    coalesced: int = 0
    hook_failures: int = 0


class DrainReport(msgspec.Struct, frozen=True):
    """What ``drain``/``publish_and_wait`` saw when they returned.

    ``ok`` is true when nothing was left; ``pending`` maps each subscriber that
    was not done to how many events it has not finished (its batch in hand
    included); ``stuck`` names subscribers whose
    ``def`` handler is past its timeout (abandoned, not waited for).
    """

    ok: bool
    pending: dict[str, int]
    stuck: tuple[str, ...] = ()


def is_async_callable(fn: Any) -> bool:
    """True if ``fn``, its ``__call__`` or the function in a ``partial`` is a coroutine function."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's coroutine __call__
    )


class Subscription:
    """One subscriber: its handler, policy, buffer and counters.

    Returned by :meth:`EventBus.subscribe`. Use :meth:`wait` as a barrier and
    :meth:`aclose` to drain and end it.
    """

    def __init__(
        self,
        bus: EventBus,
        handler: Handler,
        *,
        events: tuple[type[Event], ...],
        policy: Policy,
        name: str,
        timeout: float | None,
        envelopes: bool,
        run_key: str | None,
        is_async: bool,
        on_start: Hook | None,
        on_batch_end: Hook | None,
        on_close: Hook | None,
        hook_name: Callable[[Event | str], str] | None,
        on_interrupt: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._bus = bus
        self.handler = handler
        self.events = events
        self.policy = policy
        self.name = name
        self.timeout = timeout
        self.envelopes = envelopes
        self.run_key = run_key
        self.is_async = is_async
        self._on_start = on_start
        self._on_batch_end = on_batch_end
        self._on_close = on_close
        self._on_interrupt = on_interrupt
        self._hook_name = hook_name
        self._buffer = policy.buffer() if isinstance(policy, Latest | DropOldest) else _Unbounded()
        self._put = self._buffer.put
        # Loop-thread state.
        self._handled_upto = 0  # every matching event with seq < this is handled
        self._first_pending: float | None = None
        self._arrivals = 0  # since the last take, for bounded lag reports
        self._lag_mark = 0  # next pending/arrival count that reports lag
        self._drop_mark = 1  # next dropped count that reports lag
        self._running = False
        self._taken = 0  # events moved from the buffer into batches, ever
        self._closing = False
        self._closed = False
        # Every matching event ends in exactly one of these (or is pending): delivered
        # (its handler returned), failed (raised or timed out), dropped (by the policy,
        # or never reachable because the callback is stuck). See docs/design.md.
        self._delivered = 0
        self._failed = 0
        self._dropped_stuck = 0
        self._hook_failures = 0  # on_start / on_batch_end / on_close (not events)
        self._seconds = 0.0
        self._max_pending = 0
        # async subscriber: woken through an anyio.Event
        self._wake_evt: anyio.Event | None = None
        self._woken = False
        # def subscriber: its own thread, fed in batches
        self._queue: queue.SimpleQueue[_ThreadItem] | None = None
        self._thread: threading.Thread | None = None
        self._inflight_end: int | None = None
        self._stuck_call: int | None = None  # the call number abandoned at its timeout
        self._abandoned = False  # closed while stuck: the thread stops at the hung call
        # guards a call's end (thread) against its abandonment at the timeout (loop)
        self._lock = threading.Lock()
        # written by the subscriber's thread only
        self._t_done = 0
        self._t_delivered = 0
        self._t_failed = 0
        self._t_hook_failures = 0
        self._t_seconds = 0.0
        self._t_call_no = 0  # numbers every handler or hook call in the thread
        self._t_call_started: float | None = None  # set while a call runs
        self._t_event: Event | None = None  # the event of that call (None: a hook)
        self._t_label = ""  # the hook of that call, when it is not an event's
        #: the exception of the most recent failure (re-raised by callback_errors="raise")
        self.last_error: BaseException | None = None
        self._t_finished = False

    def __repr__(self) -> str:
        return f"<Subscription {self.name!r} policy={self.policy!r}>"

    @property
    def stuck(self) -> bool:
        """True while a ``def`` handler is past its timeout (abandoned, not waited for)."""
        # read the thread's state now: the hung call may have returned since the last tick
        call = self._stuck_call
        return (
            call is not None
            and not self._t_finished
            and self._t_call_no == call
            and self._t_call_started is not None
        )

    def _decided(self) -> int:
        """Events whose fate is decided: delivered, failed, or dropped while stuck."""
        return (
            self._delivered + self._t_delivered + self._failed + self._t_failed
        ) + self._dropped_stuck

    def _pending(self) -> int:
        """Matching events not yet handled: in the buffer, or taken and not yet done."""
        return len(self._buffer) + max(0, self._taken - self._decided())

    def stats(self) -> SubscriberStats:
        """This subscriber's counts (see :meth:`EventBus.stats`)."""
        return self._bus._stats_of(self)

    async def wait(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until this subscriber has handled every matching event up to ``seq``.

        Returns ``False`` if ``timeout`` passed first. A stuck ``def`` handler,
        an ended subscription and the calling subscriber itself count as done.
        Cancellation-safe: nothing changes for the subscriber.
        """
        return await self._bus._wait_until(lambda: self._reached(seq), timeout)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` where this subscriber's handler runs: in its thread, between two
        batches, for a ``def`` handler (a callback tied to its thread — sqlite3, a
        GUI — stays safe); on the loop for an ``async def`` one. Waits for a
        hung ``def`` handler to return; cancel the call to stop waiting.
        Raises what ``fn`` raised, or :class:`BusClosedError` if the thread ended.
        """
        q = self._queue
        if q is None:
            return fn()
        if self._t_finished:
            raise BusClosedError(f"subscriber {self.name!r} has ended; its thread is gone")
        outcome = Outcome.new()
        outcome.value = fn  # the thread calls it: see _run_thread
        q.put(outcome)
        result: T = await outcome.result()
        return result

    async def aclose(self, timeout: float | None = 30.0) -> bool:
        """Drain this subscriber, then end it: no new events, ``on_close`` runs in its
        thread or task. Returns ``False`` if the deadline passed first (a stuck
        ``def`` handler's ``on_close`` then runs when the hung call returns)."""
        bus = self._bus
        deadline = _deadline(timeout)
        ok = await self.wait(bus._next_seq - 1, _remaining(deadline))
        bus._unsubscribe(self)
        # a def handler stuck past its timeout is not waited for (its on_close runs
        # in its thread when the hung call returns)
        ended = await bus._wait_until(lambda: self._is_closed() or self.stuck, _remaining(deadline))
        bus._abandon(self)  # stuck: what it can no longer handle counts as dropped
        return ok and ended and self._is_closed()  # False while stuck

    # -- loop-thread helpers -------------------------------------------------------

    def _is_closed(self) -> bool:
        return self._closed or self._t_finished

    def _reached(self, seq: int) -> bool:
        if self._handled_upto > seq or self._stuck_call is not None or self._is_closed():
            return True
        return _current_subscription.get() is self

    def _idle(self) -> bool:
        return not self._running and self._inflight_end is None

    def _accepts(self, event: Event) -> bool:
        # a run_key subscriber sees its run's events and the run-less ones (health events)
        if self.run_key is not None and event.run_key not in (self.run_key, ""):
            return False
        # never told about itself: no lag loops, no failure storms (rules 4 and 7)
        return not (
            type(event) in _ABOUT_A_SUBSCRIBER and event.subscriber == self.name  # type: ignore[attr-defined]
        )

    def _label(self, event: Event | None, slot: str) -> str:
        """The hook to name in a failure: ``hook_name`` of the event, or of the
        lifecycle slot (``on_start``, ``on_batch_end``, ``on_close``)."""
        if self._hook_name is not None:
            try:
                return self._hook_name(slot if event is None else event)
            except Exception:
                pass
        return slot if event is None else type(event).__name__


class _Unbounded:
    """A ``Lossless`` subscriber's pending entries: a list of shared entries."""

    __slots__ = ("_items", "dropped", "forced", "put")

    def __init__(self) -> None:
        self._items: list[Entry] = []
        self.put = self._items.append
        self.dropped = self.forced = 0  # never drops

    def __len__(self) -> int:
        return len(self._items)

    def take(self) -> list[Entry]:
        out = self._items[:]
        self._items.clear()
        return out


def _deadline(timeout: float | None) -> float:
    return math.inf if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float) -> float | None:
    return None if deadline == math.inf else max(0.0, deadline - time.monotonic())


_ABOUT_A_SUBSCRIBER = (SubscriberLagged, CallbackFailed)


def current_subscription() -> Subscription | None:
    """The subscription whose handler is running in this task or thread, if any."""
    return _current_subscription.get() or getattr(_thread_local, "subscription", None)
