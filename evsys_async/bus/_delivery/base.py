"""Delivery: how one subscriber's handler gets its events. One interface, three
implementations: a task (``task.py``), a thread (``thread.py``) and a child
process fed by a thread (``process.py``, with ``spawn.py``, ``wire.py`` and the
child's side, ``child.py``).

A delivery owns its subscriber's buffer (built by its policy), runs the
handler in batches in its own task or thread, and keeps the counts:

    matched = delivered + failed + dropped + pending

``delivered``: the handler returned; ``failed``: it raised or timed out;
``dropped``: let go by the policy, or never reachable (a ``def`` handler
stuck past its timeout, a dead child, a disabled subscriber); ``pending``:
in the buffer, or taken into a batch and not yet handled. Each counter is
written in one place, where the event's fate is decided (the thread's
counters are the thread's; the one count the loop makes for a thread — a
call abandoned at its timeout — is made under the delivery's lock).

The pump (``bus/_pump.py``) fills the buffer, decides when a delivery is due and
calls :meth:`Delivery.wake`; it reaches the delivery only through the public
names below. A delivery reaches back only through :class:`Engine`.
"""

from __future__ import annotations

import bisect
import contextvars
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

from ..._util.log import get_logger
from ...errors import describe
from ...events import CallbackFailed, Event, SubscriberLagged
from ...policies import Entry, Policy
from .failures import FailureBook, Kind, in_a_row

__all__ = [
    "ABOUT_A_SUBSCRIBER",
    "Delivery",
    "Engine",
    "Handler",
    "Hook",
    "current_delivery",
    "only_failures",
    "thread_local",
]

T = TypeVar("T")
_log = get_logger()

Handler = Callable[[Any], Any]
Hook = Callable[[], Any]

#: the delivery whose handler runs in this task (set in its task or thread)
current_delivery: contextvars.ContextVar[Delivery | None] = contextvars.ContextVar(
    "evsys_current_delivery", default=None
)
#: ... and in this thread (a ``def`` handler's thread)
thread_local = threading.local()

#: events about one subscriber, never sent to that subscriber (no lag loops, no storms)
ABOUT_A_SUBSCRIBER = (SubscriberLagged, CallbackFailed)


class Engine(Protocol):
    """What a delivery may ask of the bus's pump (``_pump.Pump`` implements it)."""

    bus_id: str
    batch_size: int
    batch_delay: float
    close_timeout: float
    #: every event with seq below this has been walked into the buffers
    walked: int
    #: the event loop's anyio token (a thread runs an ``async def`` hook through it)
    token: anyio.lowlevel.EventLoopToken | None

    @property
    def hurry(self) -> bool:
        """A barrier, drain or close waits: hand everything over at once."""

    @property
    def watched(self) -> bool:
        """Someone waits for progress (a barrier, drain or close)."""

    def notify(self) -> None:
        """Progress was made: wake the waiters."""

    def arm(self, when: float) -> None:
        """Make sure the pump ticks by ``when``."""

    def wake_from_thread(self) -> None:
        """From a delivery's thread: have the pump tick soon."""

    def take_in(self) -> None:
        """Number what other threads published (a finished batch's own publishes)."""

    def new_event(self) -> anyio.Event:
        """A fresh ``anyio.Event`` of the running backend (cheap)."""

    def failed(
        self,
        delivery: Delivery,
        event: Event | None,
        exc: BaseException | None,
        slot: str,
        *,
        quiet: bool = False,
        error: str | None = None,
    ) -> None:
        """Tell the first failure of its kind (``failures.py``): log it with its
        traceback and publish ``CallbackFailed`` (not when ``quiet``); ``error`` is
        its line, when already made."""

    def failed_again(
        self, delivery: Delivery, kind: Kind, more: int, loud: int, since: float
    ) -> None:
        """Tell ``more`` failures of ``kind`` since ``since`` (wall clock) in one line,
        and publish one ``CallbackFailed`` with ``count=loud`` (when ``loud``)."""

    def interrupt(self, delivery: Delivery, exc: BaseException) -> None:
        """``KeyboardInterrupt``/``SystemExit`` from a handler on the loop's thread."""


class Delivery(ABC):
    """One subscriber's buffer, handler, lifecycle hooks and counts."""

    #: the handler runs on the event loop (a task), not in a thread of its own
    is_async = False
    #: where the handler runs: "task", "thread" or "process"
    isolation = "thread"

    def __init__(
        self,
        engine: Engine,
        handler: Handler,
        *,
        name: str,
        events: tuple[type[Event], ...],
        policy: Policy,
        timeout: float | None,
        envelopes: bool,
        run_key: str | None,
        on_start: Hook | None,
        on_batch_end: Hook | None,
        on_close: Hook | None,
        on_interrupt: Callable[[BaseException], None] | None,
        hook_name: Callable[[Event | str], str] | None,
        requires_start: bool = False,
        max_consecutive_failures: int | None = None,
    ) -> None:
        self.engine = engine
        self.handler = handler
        self.name = name
        self.events = events
        self.policy = policy
        self.timeout = timeout
        self.envelopes = envelopes
        self.run_key = run_key
        self.on_start = on_start
        self.on_batch_end = on_batch_end
        self.on_close = on_close
        self.on_interrupt = on_interrupt
        self.hook_name = hook_name
        #: ``on_start`` failed: disabled (its handler never runs on a half-built object)
        self.requires_start = requires_start
        #: this many event failures in a row disable it (None: never)
        self.max_consecutive_failures = max_consecutive_failures
        #: the backlog at which the pump hands a batch over without waiting for the delay
        self.batch_size = engine.batch_size
        self.buffer = policy.buffer()
        #: the pump's way in: the buffer's own put, bound once
        self.put = self.buffer.put
        # -- the pump's bookkeeping (loop thread) ---------------------------------
        #: every matching event with seq < this is handled
        self.handled_upto = 0
        #: when the oldest pending event arrived (None: set at the next tick)
        self.first_pending: float | None = None
        self.arrivals = 0  # since the last take: a bounded subscriber's lag (routes count)
        self.lag_mark = 0  # next pending/arrival count that reports lag
        self.drop_mark = 1  # next forced-drop count that reports lag
        self.max_pending = 0
        self.closing = False  # unsubscribed: no new events; ends after what it holds
        self.taken = 0  # events moved from the buffer into batches, ever
        # -- the counts (see the module docstring) ---------------------------------
        self.delivered = 0
        self.failed = 0
        #: dropped because no handler can take them: stuck, its process dead, disabled
        self.dropped_stuck = 0
        self.hook_failures = 0
        #: failed lifecycle calls by the hook ``hook_name`` names (``setup``, ``flush``)
        self.failed_hooks: dict[str, int] = {}
        self.seconds = 0.0
        #: how its failures are told: the first of each kind, then summaries
        self.book = FailureBook(self)
        # failures in a row: the streak, and ``delivered`` when it began (a success
        # between two failures ends it; nothing is counted per success)
        self._streak = 0
        self._streak_mark = -1
        #: the exception of the most recent failure (callback_errors="raise" re-raises it)
        self.last_error: BaseException | None = None
        #: the public handle (a ``Subscription``), set by the bus
        self.handle: object | None = None
        #: seconds from subscribe until it could take its first event (a process's start)
        self.startup_seconds = 0.0
        #: why it handles no more events (its process died, its ``on_start`` failed, too
        #: many failures in a row), else None; from then on its events are dropped
        self.disabled: str | None = None

    # -- what the pump calls (loop thread) ---------------------------------------

    @abstractmethod
    def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Start the task or thread; ``on_start`` runs there before the first event."""

    @property
    @abstractmethod
    def idle(self) -> bool:
        """Not handling a batch now: may be woken."""

    @abstractmethod
    def wake(self) -> None:
        """Hand over what is pending now (``idle`` is true)."""

    def poll(self, now: float) -> float:
        """Collect a finished batch, check a timeout; the next deadline to look again."""
        return math.inf

    @abstractmethod
    def begin_close(self) -> None:
        """Unsubscribed: handle what is already pending, run ``on_close``, end."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """Ended: ``on_close`` has run (or the task was cancelled)."""

    @property
    def stuck(self) -> bool:
        """A ``def`` handler past its timeout, abandoned and not yet returned."""
        return False

    @abstractmethod
    def abandon(self) -> None:
        """At close, give up on a stuck delivery (what it cannot handle is dropped)."""

    @abstractmethod
    def cancel(self) -> None:
        """The bus is closing past its drain: end the task now (a thread cannot be)."""

    @abstractmethod
    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` where the handler runs, between two batches."""

    # -- shared ------------------------------------------------------------------

    def take(self) -> list[Entry]:
        """Everything pending, as one batch (the lag bookkeeping starts over)."""
        self.first_pending = None
        self.arrivals = 0
        self.lag_mark = 0  # lag is reported again from the threshold up
        batch = self.buffer.take()
        self.taken += len(batch)
        return batch

    def accepts(self, event: Event) -> bool:
        """Run-key filter, and never an event about this subscriber itself."""
        # a run_key subscriber sees its run's events and the run-less ones (health events)
        if self.run_key is not None and event.run_key not in (self.run_key, ""):
            return False
        return not (
            type(event) in ABOUT_A_SUBSCRIBER and event.subscriber == self.name  # type: ignore[attr-defined]
        )

    def reached(self, seq: int) -> bool:
        """Has handled every matching event up to ``seq`` (or cannot: stuck, ended, or
        it is the caller's own subscriber)."""
        if self.handled_upto > seq or self.stuck or self.closed:
            return True
        return current_delivery.get() is self

    def decided(self) -> int:
        """Events whose fate is decided: delivered, failed, or dropped while stuck."""
        return self.delivered + self.failed + self.dropped_stuck

    def pending(self) -> int:
        """Matching events not yet handled: in the buffer, or taken and not yet done."""
        return len(self.buffer) + max(0, self.taken - self.decided())

    def label(self, event: Event | None, slot: str) -> str:
        """The hook to name in a failure: ``hook_name`` of the event, or of the
        lifecycle slot (``on_start``, ``on_batch_end``, ``on_close``)."""
        if self.hook_name is not None:
            try:
                return self.hook_name(slot if event is None else event)
            except Exception:
                pass
        return slot if event is None else type(event).__name__

    def describe(self, exc: BaseException) -> str:
        """A failure's one line (``"ValueError: nan"``, ``"timeout after 5.0s"``); never
        raises (an exception whose ``__str__`` fails is named by its type)."""
        try:
            return describe(exc, timeout=self.timeout)
        except Exception:
            return f"{type(exc).__name__}: (its message could not be made)"

    def count_failure(
        self, event: Event | None, exc: BaseException, slot: str = "", *, quiet: bool = False
    ) -> None:
        """Count a failure of an event's call (or of a hook: ``event`` is ``None``), then
        tell it if it is the first of its kind (``failures.py``): a counter
        increment, for every failure after the first."""
        self.tally(event, exc, slot)
        self.book.record(event, exc, slot, quiet)

    def tally(self, event: Event | None, exc: BaseException | None, slot: str) -> None:
        """Count a failure: an event's in ``failed``, a hook's in ``hook_failures`` (and
        by hook); disable the subscriber when its policy says so."""
        if exc is not None:
            self.last_error = exc
        if event is None:
            self.hook_failures += 1
            hook = self.label(None, slot)
            self.failed_hooks[hook] = self.failed_hooks.get(hook, 0) + 1
            if slot == "on_start" and self.requires_start and exc is not None:
                self.disable(f"{hook} failed: {self.describe(exc)}")
            return
        self.failed += 1
        limit = self.max_consecutive_failures
        if limit is not None:
            if self.delivered != self._streak_mark:  # something succeeded since
                self._streak, self._streak_mark = 0, self.delivered
            self._streak += 1
            if self._streak >= limit and exc is not None:
                self.disable(in_a_row(limit, self.describe(exc)))

    def disable(self, reason: str) -> None:
        """No more events for this handler: the rest count as dropped (``on_close``
        still runs). Logged once; the first reason stays."""
        if self.disabled is not None:
            return
        self.disabled = reason
        _log.warning("callback disabled for the rest of its run", callback=self.name, reason=reason)

    def drop_rest(self, batch: list[Entry], start: int) -> None:
        """A disabled handler's events from ``batch[start]`` on: dropped, counted here."""
        self.dropped_stuck += len(batch) - start

    def drop_after(self, batch: list[Entry], seq: int) -> None:
        """Disabled while handling event ``seq`` of ``batch``: the events after it."""
        self.drop_rest(batch, bisect.bisect_right(batch, seq, key=_seq))

    def tell_failures(self) -> bool:
        """Tell the failures no summary told yet (at a drain, and when it ends); True
        if there were any (a ``CallbackFailed`` may have been published)."""
        return self.book.flush()

    def tell_first(
        self, event: Any, exc: BaseException | None, slot: str, quiet: bool, kind: Kind
    ) -> None:
        self.engine.failed(self, event, exc, slot, quiet=quiet, error=kind.error)

    def tell_again(self, kind: Kind, more: int, loud: int, since: float) -> None:
        self.engine.failed_again(self, kind, more, loud, since)


def _seq(entry: Entry) -> int:
    return entry[0]


def only_failures(batch: list[Entry]) -> bool:
    """The batch holds nothing but ``CallbackFailed``: a failure handling it is not
    announced again (a broken sink must not start a storm)."""
    return all(type(event) is CallbackFailed for _, event in batch)
