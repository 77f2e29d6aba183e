"""EventBus: one intake, one pump, and a task (or thread) per subscriber.

How an event travels:

1. ``publish`` (any thread) appends the event to the bus's intake and, if the
   pump is not already due, wakes it. It is O(1) whatever the number of
   subscribers, never awaits and never raises because of a subscriber.
2. The pump numbers nothing twice: on the loop thread an event gets its
   sequence number at ``publish``; from another thread when the loop takes it
   in. The pump walks new events through the type -> subscribers map fixed at
   ``subscribe`` and puts a shared ``(seq, event)`` entry into each matching
   subscriber's buffer; the buffer's policy decides what it keeps.
3. A subscriber is woken when its backlog reaches ``batch_size`` or its oldest
   pending event is ``batch_delay`` old (one timer for the whole bus), and at
   once while a barrier, ``drain`` or close waits. Each wake hands it
   everything pending: an ``async def`` handler runs in its own task, a
   ``def`` handler in its own daemon thread, one call at a time.

Guarantees: each subscriber sees its events in publish order; a handler that
raises, hangs or is slow stalls neither the publisher nor its siblings; a
``Lossless`` subscriber never loses an event while the bus is open, and
leaving ``async with`` drains (shielded) before anything is cancelled.
"""

from __future__ import annotations

import functools
import inspect
import math
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

from ._log import get_logger
from ._worker import Outcome
from .errors import BusClosedError, describe
from .events import CallbackFailed, Envelope, Event, SubscriberLagged
from .policies import DropOldest, Entry, Latest, Lossless, Policy
from .subscription import (
    _ABOUT_A_SUBSCRIBER,
    DrainReport,
    Handler,
    Hook,
    SubscriberStats,
    Subscription,
    _current_subscription,
    _thread_local,
    current_subscription,
    is_async_callable,
)

__all__ = [
    "DrainReport",
    "EventBus",
    "SubscriberStats",
    "Subscription",
    "current_subscription",
    "is_async_callable",
    "shielded",
]

_log = get_logger()
T = TypeVar("T")

#: ended subscriptions whose stats stay in ``stats()``; older closed ones are let go
_ENDED_KEPT = 256


class EventBus:
    """An in-process async event bus for asyncio and trio.

    Use it as an async context manager; it owns its subscriber tasks and
    threads. ``batch_size`` and ``batch_delay`` set when an idle subscriber is
    woken (see the module docstring); ``lag_threshold`` when
    ``SubscriberLagged`` is published; ``close_timeout`` bounds the drain when
    the block is left.
    """

    def __init__(
        self,
        *,
        close_timeout: float = 30.0,
        lag_threshold: int = 1000,
        batch_size: int = 32,
        batch_delay: float = 0.005,
        bus_id: str | None = None,
    ) -> None:
        if batch_size < 1 or batch_delay < 0 or lag_threshold < 1:
            raise ValueError(
                "EventBus: batch_size and lag_threshold must be >= 1 and batch_delay >= 0, "
                f"got batch_size={batch_size}, lag_threshold={lag_threshold}, "
                f"batch_delay={batch_delay}"
            )
        self.bus_id = bus_id or uuid.uuid4().hex
        self.close_timeout = close_timeout
        self.lag_threshold = lag_threshold
        self.batch_size = batch_size
        self.batch_delay = batch_delay
        self._subs: list[Subscription] = []
        self._ended: list[Subscription] = []  # unsubscribed; kept for stats and close
        self._closing_threads: list[Subscription] = []  # ended, their thread not done yet
        self._names: set[str] = set()
        self._routes: dict[type, tuple[Subscription, ...]] = {}
        self._new: list[Event] = []  # published on the loop thread, not yet walked
        self._next_seq = 0  # seq of the next event published
        self._walked = 0  # every event with seq < this has been routed
        self._intake: deque[Event] = deque()  # published from other threads
        self._thread_wake_pending = False
        self._loop_thread: int | None = None
        self._open = False
        self._closed = False
        self._dropped_after_close = 0
        self._pump_evt: anyio.Event | None = None
        self._pump_due = False
        self._timer_armed = False
        self._pump_deadline = math.inf  # when the sleeping pump ticks next on its own
        self._accepting = False  # publish takes events in (False before enter, from close on)
        self._intake_lock = threading.Lock()
        self._drop_lock = threading.Lock()
        self._last_tick = -math.inf
        self._progress: anyio.Event | None = None
        self._waiters = 0
        self._urgent = 0
        self._tg: Any = None
        # Subscriber tasks and the pump are shielded from the block's cancellation
        # (they must drain first); close cancels them through their own scopes.
        self._task_scopes: list[anyio.CancelScope] = []
        self._anyio_token: Any = None
        #: KeyboardInterrupt/SystemExit from a handler without an owner: raised at exit
        self._interrupted: BaseException | None = None
        self._current_task: Callable[[], Any] = _no_task
        self._call_soon_threadsafe: Callable[[Callable[[], None]], None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._open or self._closed:
            raise BusClosedError("an EventBus can be entered once; create a new one")
        token = anyio.lowlevel.current_token()
        self._anyio_token = token
        native = token.native_token
        if hasattr(native, "call_soon_threadsafe"):  # asyncio event loop
            import asyncio

            self._call_soon_threadsafe = native.call_soon_threadsafe
            self._current_task = asyncio.current_task  # to undo a handler's self-cancel
        else:  # trio token: idempotent, so a burst of wakes costs one callback
            self._call_soon_threadsafe = functools.partial(_trio_soon, native)
        self._loop_thread = threading.get_ident()
        # anyio.Event() looks the backend up on every call (~1.2 us); the backend's
        # own class, taken once here, does not. One is made per subscriber wake.
        self._new_event: Callable[[], anyio.Event] = type(anyio.Event())
        self._pump_evt = self._new_event()
        self._progress = self._new_event()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._open = True
        self._accepting = True
        self._tg.start_soon(self._pump, self._task_scope(), name="evsys-bus-pump")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            await self._shutdown()
        finally:
            for scope in self._task_scopes:
                scope.cancel()
            self._tg.cancel_scope.cancel()
            # the block's own error propagates as is, not wrapped in an ExceptionGroup
            own_error = exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class())
            args = (None, None, None) if own_error else (exc_type, exc, tb)
            result: bool | None = await self._tg.__aexit__(*args)
        if self._interrupted is not None:  # a handler's KeyboardInterrupt/SystemExit
            raise self._interrupted
        return None if own_error else result

    async def _shutdown(self) -> None:
        deadline = time.monotonic() + self.close_timeout
        native_cancel: BaseException | None = None
        report = None
        try:
            with anyio.CancelScope(shield=True):
                while True:
                    try:
                        report = await self.drain(timeout=max(0.0, deadline - time.monotonic()))
                        break
                    except BaseException as exc:
                        # A native asyncio cancellation (uvicorn's shutdown, a nested
                        # asyncio.timeout) pierces anyio's shield: finish the drain first.
                        if not _absorb_native_cancel(exc, deadline):
                            raise
                        native_cancel = exc
                with self._intake_lock:
                    self._take_intake()
                    self._accepting = False  # from here on a publish is counted as dropped
                self._tick()
                for sub in list(self._subs):
                    self._unsubscribe(sub)
                while True:
                    try:
                        await self._wait_until(
                            lambda: all(s._is_closed() or s.stuck for s in self._ended),
                            max(0.0, deadline - time.monotonic()),
                        )
                        break
                    except BaseException as exc:
                        if not _absorb_native_cancel(exc, deadline):
                            raise
                        native_cancel = exc
                self._close_state()  # before the report: late publishes count as dropped
                for sub in self._ended:
                    self._abandon(sub)
                    pending = sub._pending()
                    if pending or sub.stuck or not sub._is_closed():
                        _log.warning(
                            "bus closed with undelivered events",
                            subscriber=sub.name,
                            pending=pending,
                            stuck=sub.stuck,
                            delivered=sub._delivered + sub._t_delivered,
                        )
                if report is not None and not report.ok:
                    _log.warning("bus drain deadline passed", pending=report.pending)
        finally:
            self._close_state()  # also when a native cancel past the deadline ends it
        if native_cancel is not None:
            raise native_cancel

    def _close_state(self) -> None:
        with self._intake_lock:
            self._accepting = False
        self._open = False
        self._closed = True
        self._take_intake()  # counted as dropped: nobody is left to deliver them

    # -- subscribe ---------------------------------------------------------------

    def subscribe(
        self,
        handler: Handler,
        *,
        events: Iterable[type[Event]] = (Event,),
        policy: Policy | None = None,
        name: str | None = None,
        timeout: float | None = None,
        envelopes: bool = False,
        run_key: str | None = None,
        sync: bool | None = None,
        on_start: Hook | None = None,
        on_batch_end: Hook | None = None,
        on_close: Hook | None = None,
        hook_name: Callable[[Event | str], str] | None = None,
        on_interrupt: Callable[[BaseException], None] | None = None,
    ) -> Subscription:
        """Add a subscriber; it sees matching events published from now on.

        ``events`` matches by type, subclasses included. ``handler`` takes one
        argument (the event, or an :class:`Envelope` with ``envelopes=True``)
        and is ``def`` (run in the subscriber's own daemon thread) or
        ``async def`` (run in its own task); ``sync`` overrides the check.
        ``on_start``/``on_batch_end``/``on_close`` run in that thread or task
        before the first event, after each batch, after the last.
        ``hook_name(event_or_slot)`` names the hook in failure logs (the slot is
        ``"on_start"``, ``"on_batch_end"`` or ``"on_close"`` for those).
        ``timeout`` bounds each call: an async call is cancelled, a ``def``
        call abandoned; both count as failed.

        Nothing the handler raises leaves its subscriber: an exception, a stray
        cancellation (one this bus did not cause) and, in a ``def`` handler's
        thread, any ``BaseException`` are counted and logged as its failure, and
        it goes on with its next event. ``KeyboardInterrupt``/``SystemExit`` from
        an ``async def`` handler (on the event loop's thread) also ask to stop:
        ``on_interrupt(exc)`` is called on the loop if given, else the bus cancels
        its ``async with`` block and re-raises the exception after the drain.

        Raises ``TypeError`` for a handler that cannot take one argument or a
        non-``Event`` type, and :class:`BusClosedError` outside the bus's block.
        """
        if not self._open:
            raise BusClosedError(
                "subscribe() needs an open bus: call it inside `async with EventBus() as bus:`"
            )
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError(
                "subscribe() must be called on the bus's event loop thread; from a worker "
                "thread use anyio.from_thread.run_sync(bus.subscribe, ...)"
            )
        _check_handler(handler)
        types = tuple(events)
        for t in types:
            if not (isinstance(t, type) and issubclass(t, Event)):
                raise TypeError(
                    f"subscribe(events=...) takes Event subclasses, got {t!r}; "
                    "e.g. events=(ev.events.StepEnded,)"
                )
        policy = Lossless() if policy is None else policy
        if not isinstance(policy, Lossless | Latest | DropOldest):
            raise TypeError(f"policy must be Lossless(), Latest() or DropOldest(n), got {policy!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"subscribe(timeout=...) must be > 0 or None, got {timeout}")
        is_async = is_async_callable(handler) if sync is None else not sync
        sub = Subscription(
            self,
            handler,
            events=types,
            policy=policy,
            name=self._unique_name(name or _default_name(handler)),
            timeout=timeout,
            envelopes=envelopes,
            run_key=run_key,
            is_async=is_async,
            on_start=on_start,
            on_batch_end=on_batch_end,
            on_close=on_close,
            hook_name=hook_name,
            on_interrupt=on_interrupt,
        )
        self._tick()  # what was published before subscribe is not this subscriber's
        sub._handled_upto = self._walked
        self._subs.append(sub)
        self._routes.clear()
        if is_async:
            sub._wake_evt = self._new_event()
            self._tg.start_soon(
                self._run_async, sub, self._task_scope(), name=f"evsys-sub:{sub.name}"
            )
        else:
            sub._queue = queue.SimpleQueue()
            sub._t_done = self._walked
            sub._thread = threading.Thread(
                target=self._run_thread, args=(sub,), name=f"evsys-sub:{sub.name}", daemon=True
            )
            sub._thread.start()
        return sub

    def _unique_name(self, base: str) -> str:
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}#{n}"
        self._names.add(name)
        return name

    def _unsubscribe(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._tick()
            self._subs.remove(sub)
            self._routes.clear()
            self._ended.append(sub)
            if len(self._ended) > _ENDED_KEPT:  # a service bus lives long: bound the history
                gone = [s for s in self._ended[:-_ENDED_KEPT] if s._is_closed()]
                for old in gone:
                    self._ended.remove(old)
                    self._names.discard(old.name)
        sub._closing = True
        if sub.is_async:
            self._wake(sub)
        elif sub._queue is not None and not sub._t_finished:
            # the thread drains what it holds, runs on_close, then ends; its last
            # calls stay under the handler's timeout (see _tick)
            pending = self._take(sub)
            if pending:
                sub._inflight_end = self._walked
                sub._queue.put((pending, self._walked))
            sub._queue.put(None)
            self._closing_threads.append(sub)

    # -- publish -----------------------------------------------------------------

    def publish(self, event: Event) -> int | None:
        """Publish ``event`` to every matching subscriber.

        Never blocks, never awaits, never raises because of a subscriber;
        callable from any thread. Returns the event's sequence number on the
        loop thread (``None`` from another thread, where it is numbered when
        the loop takes it in). After the bus closed the event is counted as
        dropped and logged once. Raises ``TypeError`` for a non-``Event``.
        """
        if threading.get_ident() != self._loop_thread:
            self._publish_foreign(event)
            return None
        if not isinstance(event, Event):
            raise TypeError(f"publish() takes an Event, got {type(event).__name__}")
        if not self._accepting:
            self._drop_closed(event)
            return None
        seq = self._next_seq
        self._next_seq = seq + 1
        self._new.append(event)
        if not self._pump_due and (
            not self._timer_armed
            or self._urgent
            or len(self._new) >= self.batch_size
            # A batch falls due: hand it over now, while the loop is awake anyway.
            # The timer is only the fallback for when publishing stops: a timer
            # firing inside a sleeping step costs the step more than this does.
            or time.monotonic() >= self._pump_deadline
        ):
            self._pump_due = True
            self._pump_evt.set()  # type: ignore[union-attr]
        return seq

    def _publish_foreign(self, event: Event) -> None:
        if not isinstance(event, Event):
            raise TypeError(f"publish() takes an Event, got {type(event).__name__}")
        if self._loop_thread is None:
            raise BusClosedError(
                "publish() before the bus was entered: use `async with EventBus() as bus:`"
            )
        with self._intake_lock:
            if not self._accepting:
                self._drop_closed(event)
                return
            self._intake.append(event)
        self._wake_from_thread()

    def _drop_closed(self, event: Event) -> None:
        with self._drop_lock:  # publishers in several threads: count each, log once
            self._dropped_after_close += 1
            first = self._dropped_after_close == 1
        if first:
            _log.warning(
                "event published after the bus closed; dropped",
                event_type=type(event).__name__,
            )

    def _wake_from_thread(self) -> None:
        if self._thread_wake_pending:
            return
        self._thread_wake_pending = True
        try:
            self._call_soon_threadsafe(self._on_thread_wake)  # type: ignore[misc]
        except RuntimeError:  # the event loop is gone; nothing to wake
            self._thread_wake_pending = False

    def _on_thread_wake(self) -> None:
        # Runs on the loop thread as a plain callback: must never raise.
        self._thread_wake_pending = False
        try:
            if self._open:
                self._take_intake()
                if not self._pump_due:
                    self._pump_due = True
                    self._pump_evt.set()  # type: ignore[union-attr]
            self._notify()
        except Exception:  # pragma: no cover - defensive: a wake callback must not raise
            _log.exception("bus wake callback failed")

    def _take_intake(self) -> None:
        intake = self._intake
        while intake:
            event = intake.popleft()
            if self._accepting:
                self._next_seq += 1
                self._new.append(event)
            else:
                self._drop_closed(event)

    # -- waiting -----------------------------------------------------------------

    async def publish_and_wait(self, event: Event, timeout: float | None = 5.0) -> DrainReport:
        """Publish ``event`` and wait until every matching subscriber handled it.

        Returns a report naming those that had not when ``timeout`` passed; it
        does not raise on the deadline. Called from inside a handler, it does
        not wait for the calling subscriber.
        """
        if not self._accepting:
            raise BusClosedError(
                "publish_and_wait() needs an open bus: call it inside `async with EventBus()`"
            )
        seq = self.publish(event)
        if seq is None:
            raise RuntimeError("publish_and_wait() must be awaited on the bus's event loop")
        self._tick()
        routed = self._routes.get(type(event))
        if routed is None:
            routed = self._route(type(event))
        waiting = [s for s in routed if s._accepts(event)]
        await self._wait_until(lambda: all(s._reached(seq) for s in waiting), timeout)
        return self._report(waiting, seq)

    async def drain(
        self,
        timeout: float | None = 30.0,
        *,
        subscriptions: Iterable[Subscription] | None = None,
    ) -> DrainReport:
        """Wait until every subscriber has handled, or dropped by its policy, every
        event published before the call and while it waits.

        ``subscriptions`` limits the wait to those (a run on a shared bus waits
        for its own callbacks, not for other runs'). Returns a report; does not
        raise on the deadline. Stuck ``def`` handlers and, inside a handler, the
        calling subscriber are not waited for. Cancellation-safe.
        """
        chosen = None if subscriptions is None else list(subscriptions)

        def quiet() -> bool:
            self._take_intake()
            if self._new or self._intake:
                return False
            # handled_upto == walked implies an empty buffer: entries are all < walked
            subs = self._subs if chosen is None else chosen
            return all(s._reached(self._walked - 1) for s in subs)

        await self._wait_until(quiet, timeout)
        return self._report(self._subs if chosen is None else chosen, self._walked - 1)

    def _report(self, subs: list[Subscription], seq: int) -> DrainReport:
        pending = {s.name: self._pending_of(s) for s in subs if not s._reached(seq)}
        stuck = tuple(s.name for s in subs if s.stuck)
        return DrainReport(ok=not pending, pending=pending, stuck=stuck)

    async def _wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        self._waiters += 1
        self._urgent += 1
        try:
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                while True:
                    self._tick()
                    if done():
                        return True
                    await self._progress.wait()  # type: ignore[union-attr]
            self._tick()
            return done()
        finally:
            self._waiters -= 1
            self._urgent -= 1

    def _notify(self) -> None:
        if self._waiters:
            self._progress.set()  # type: ignore[union-attr]
            self._progress = self._new_event()

    # -- stats -------------------------------------------------------------------

    def stats(self) -> dict[str, SubscriberStats]:
        """``{name: SubscriberStats}`` for every subscriber, the latest 256 ended ones
        included (a long-lived bus lets older ones go, and their names).

        On the loop thread it first takes in everything published so far, so
        the counts are current at the call.
        """
        if threading.get_ident() == self._loop_thread and self._open:
            self._tick()
        return {s.name: self._stats_of(s) for s in self._subs + self._ended}

    def _pending_of(self, sub: Subscription) -> int:
        return sub._pending()

    def _stats_of(self, sub: Subscription) -> SubscriberStats:
        return SubscriberStats(
            delivered=sub._delivered + sub._t_delivered,
            pending=sub._pending(),
            dropped=sub._buffer.dropped + sub._dropped_stuck,
            failed=sub._failed + sub._t_failed,
            max_pending=sub._max_pending,
            handler_seconds=sub._seconds + sub._t_seconds,
            coalesced=sub._buffer.dropped - sub._buffer.forced,
            hook_failures=sub._hook_failures + sub._t_hook_failures,
        )

    @property
    def last_seq(self) -> int:
        """The sequence number of the latest event numbered so far (-1 before any)."""
        return self._next_seq - 1

    @property
    def dropped_after_close(self) -> int:
        """Events published after the bus closed (counted, logged once, not delivered)."""
        return self._dropped_after_close

    # -- the pump ----------------------------------------------------------------

    def _task_scope(self) -> anyio.CancelScope:
        # Made before the task starts: a block that never yields may be left (and
        # the scope cancelled) before the task first runs.
        scope = anyio.CancelScope(shield=True)
        self._task_scopes.append(scope)
        return scope

    async def _pump(self, scope: anyio.CancelScope) -> None:
        with scope:
            await self._pump_loop()

    async def _pump_loop(self) -> None:
        next_deadline = math.inf
        while True:
            # the fallback fires one batch_delay late, so that a publish usually
            # finds the batch due first (see publish)
            delay = next_deadline + self.batch_delay - time.monotonic()
            if delay > 0:
                with anyio.move_on_after(delay):
                    await self._pump_evt.wait()  # type: ignore[union-attr]
            if self._pump_due:
                self._pump_evt = self._new_event()
                self._pump_due = False
            walked = self._walked
            self._pump_deadline = math.inf  # this tick decides the next one
            next_deadline = self._tick()
            if self._walked != walked:
                # events are flowing: tick again after batch_delay instead of being
                # woken by every publish (publish still wakes us for a full batch)
                next_deadline = min(next_deadline, time.monotonic() + self.batch_delay)
            self._pump_deadline = next_deadline
            # publish may rely on the timer only if it fires within a batch delay; a
            # def handler's timeout deadline may be far away
            self._timer_armed = next_deadline <= time.monotonic() + self.batch_delay

    def _route(self, cls: type) -> tuple[Subscription, ...]:
        subs = tuple(s for s in self._subs if issubclass(cls, s.events))
        self._routes[cls] = subs
        return subs

    def _tick(self) -> float:
        """Walk new events into buffers, collect finished batches, wake who is due.

        Returns the earliest deadline at which a subscriber becomes due.
        """
        self._take_intake()
        new = self._new
        if new:
            self._new = []
            routes = self._routes
            seq = self._walked
            for event in new:
                subs = routes.get(event.__class__)
                if subs is None:
                    subs = self._route(event.__class__)
                if subs:
                    entry = (seq, event)
                    about_a_subscriber = type(event) in _ABOUT_A_SUBSCRIBER
                    for sub in subs:
                        if (about_a_subscriber or sub.run_key is not None) and not sub._accepts(
                            event
                        ):
                            continue
                        sub._put(entry)
                        sub._arrivals += 1
                seq += 1
            self._walked = seq
        now = time.monotonic()
        walked = self._walked
        urgent = self._urgent
        deadline = math.inf
        lagged: SubscriberLagged | None = None
        if self._closing_threads:  # ended def subscribers still finishing their last batch
            self._closing_threads = [s for s in self._closing_threads if not s._t_finished]
            for sub in self._closing_threads:
                deadline = min(deadline, self._check_thread(sub, now))
        for sub in self._subs:
            if not sub.is_async:
                deadline = min(deadline, self._check_thread(sub, now))
            n = len(sub._buffer)
            if n > sub._max_pending:
                sub._max_pending = n
            if lagged is None and sub._arrivals:
                lagged = self._lag(sub, n)
            if not sub._idle():
                if n and not sub.is_async:
                    # its thread is busy and more waits: look again soon (the thread
                    # also wakes us when it finishes with a backlog)
                    deadline = min(deadline, now + self.batch_delay)
                continue
            if n == 0:
                sub._handled_upto = walked
                continue
            first = sub._first_pending
            if first is None:
                # its oldest event was published after the previous tick, at the earliest
                sub._first_pending = first = self._last_tick
            if urgent or n >= self.batch_size or now - first >= self.batch_delay:
                self._wake(sub)
            else:
                deadline = min(deadline, first + self.batch_delay)
        self._last_tick = now
        if lagged is not None and self._accepting:
            self.publish(lagged)
        self._notify()
        return deadline

    def _lag(self, sub: Subscription, pending: int) -> SubscriberLagged | None:
        threshold = self.lag_threshold
        if isinstance(sub.policy, Lossless):
            count = pending
        else:
            dropped = sub._buffer.dropped
            forced = sub._buffer.forced  # coalescing is not lag: only forced drops
            if forced >= sub._drop_mark:
                sub._drop_mark = max(sub._drop_mark, forced) * 2
                return SubscriberLagged(subscriber=sub.name, pending=pending, dropped=dropped)
            count = sub._arrivals
        mark = sub._lag_mark or threshold
        if count < mark:
            return None
        while mark <= count:  # one report per crossing, even across several doublings
            mark *= 2
        sub._lag_mark = mark
        return SubscriberLagged(subscriber=sub.name, pending=pending, dropped=sub._buffer.dropped)

    def _wake(self, sub: Subscription) -> None:
        if sub.is_async:
            if not sub._woken and sub._wake_evt is not None:
                sub._woken = True
                sub._wake_evt.set()
            return
        if sub._inflight_end is None and len(sub._buffer) and not sub._closing:
            batch = self._take(sub)
            sub._inflight_end = self._walked
            sub._queue.put((batch, self._walked))  # type: ignore[union-attr]
            if sub.timeout is not None:
                self._arm(time.monotonic() + sub.timeout)

    def _arm(self, when: float) -> None:
        # make sure the pump ticks by `when` (whoever's tick woke the subscriber)
        if when < self._pump_deadline and not self._pump_due and self._pump_evt is not None:
            self._pump_due = True
            self._pump_evt.set()

    def _take(self, sub: Subscription) -> list[Entry]:
        sub._first_pending = None
        sub._arrivals = 0
        sub._lag_mark = 0  # lag is reported again from the threshold up
        batch = sub._buffer.take()
        sub._taken += len(batch)
        return batch

    # -- async subscribers -------------------------------------------------------

    async def _run_async(self, sub: Subscription, scope: anyio.CancelScope) -> None:
        with scope:
            await self._run_async_shielded(sub, scope)

    async def _run_async_shielded(self, sub: Subscription, scope: anyio.CancelScope) -> None:
        _current_subscription.set(sub)
        try:
            if sub._on_start is not None:
                await self._call_hook_async(sub, sub._on_start, "on_start", scope)
            while True:
                await self._wait_for_wake(sub, scope)
                sub._wake_evt = self._new_event()
                sub._woken = False
                while len(sub._buffer):
                    sub._running = True
                    end = self._walked
                    batch = self._take(sub)
                    await self._handle_async(sub, batch, scope)
                    if sub._on_batch_end is not None:
                        # a flush is part of handling: barriers wait for it (as for def)
                        await self._call_hook_async(
                            sub,
                            sub._on_batch_end,
                            "on_batch_end",
                            scope,
                            quiet=_only_failures(batch),
                        )
                    sub._handled_upto = max(sub._handled_upto, end)
                    sub._running = False
                    self._notify()
                    if not (self._urgent or len(sub._buffer) >= self.batch_size or sub._closing):
                        if len(sub._buffer):  # what came meanwhile: due one delay from now
                            self._arm(time.monotonic() + self.batch_delay)
                        break
                if sub._closing and not len(sub._buffer):
                    break
        finally:
            sub._running = False
            if sub._on_close is not None:
                with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
                    await self._call_hook_async(sub, sub._on_close, "on_close", scope)
            sub._closed = True
            self._notify()

    async def _wait_for_wake(self, sub: Subscription, scope: anyio.CancelScope) -> None:
        """Wait to be woken; a stray cancellation of this task (not the bus's) is ignored."""
        while True:
            try:
                await sub._wake_evt.wait()  # type: ignore[union-attr]
                return
            except anyio.get_cancelled_exc_class():
                if scope.cancel_called:
                    raise
                _log.warning("stray cancellation of a subscriber task ignored", subscriber=sub.name)
                task = self._current_task()
                if task is not None:
                    await _undo_self_cancel(task, 0, scope)

    async def _handle_async(
        self, sub: Subscription, batch: list[Entry], scope: anyio.CancelScope
    ) -> None:
        handler = sub.handler
        timeout = sub.timeout
        envelopes = sub.envelopes
        bus_id = self.bus_id
        task = self._current_task()  # None on trio: there a hook cannot cancel its own task
        base = task.cancelling() if task is not None else 0
        started = time.perf_counter()
        for seq, event in batch:
            arg = Envelope(bus_id, seq, event) if envelopes else event
            try:
                if timeout is None:
                    await handler(arg)
                else:
                    with anyio.fail_after(timeout):
                        await handler(arg)
            except Exception as exc:
                self._failure(sub, event, exc)
            except BaseException as exc:
                self._base_failure(sub, event, exc, scope)
                if task is not None:
                    await _undo_self_cancel(task, base, scope)
            else:
                if task is not None and task.cancelling() != base and not scope.cancel_called:
                    # it cancelled its own task and returned: that cancel is not ours
                    self._failure(sub, event, _self_cancel_error())
                    await _undo_self_cancel(task, base, scope)
                else:
                    sub._delivered += 1
            if sub._on_batch_end is None:
                sub._handled_upto = seq + 1
        sub._seconds += time.perf_counter() - started

    async def _call_hook_async(
        self,
        sub: Subscription,
        hook: Hook,
        label: str,
        scope: anyio.CancelScope,
        *,
        quiet: bool = False,
    ) -> None:
        task = self._current_task()
        base = task.cancelling() if task is not None else 0
        try:
            with anyio.fail_after(math.inf if sub.timeout is None else sub.timeout):
                result = hook()
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            self._failure(sub, None, exc, label, quiet=quiet)
        except BaseException as exc:
            self._base_failure(sub, None, exc, scope, label)
            if task is not None:
                await _undo_self_cancel(task, base, scope)
        else:
            if task is not None and task.cancelling() != base and not scope.cancel_called:
                self._failure(sub, None, _self_cancel_error(), label, quiet=quiet)
                await _undo_self_cancel(task, base, scope)

    def _base_failure(
        self,
        sub: Subscription,
        event: Event | None,
        exc: BaseException,
        scope: anyio.CancelScope,
        label: str | None = None,
    ) -> None:
        """A ``BaseException`` from an ``async def`` handler or hook, on the loop's thread.

        The bus's own cancellation of this subscriber propagates. Anything else
        is the subscriber's failure (a stray cancellation, ``GeneratorExit``, an
        exception group); ``KeyboardInterrupt``/``SystemExit`` also ask to stop.
        """
        if scope.cancel_called and isinstance(exc, anyio.get_cancelled_exc_class()):
            raise exc
        self._failure(sub, event, exc, label)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            self._interrupt(sub, exc)

    def _interrupt(self, sub: Subscription, exc: BaseException) -> None:
        """``KeyboardInterrupt``/``SystemExit`` in a handler on the loop: its owner
        (a run) stops; without one, the bus's block is cancelled and the exception
        is raised when it is left."""
        if sub._on_interrupt is not None:
            try:
                sub._on_interrupt(exc)
            except Exception:  # pragma: no cover - the owner's hook must not raise
                _log.exception("on_interrupt failed", subscriber=sub.name)
            return
        if self._interrupted is None:
            self._interrupted = exc
            self._tg.cancel_scope.cancel()

    # -- def subscribers ---------------------------------------------------------

    def _run_thread(self, sub: Subscription) -> None:
        q = sub._queue
        assert q is not None
        _thread_local.subscription = sub
        # from_thread.run copies this thread's context: drain/publish_and_wait called
        # from the handler then skip the caller (see Subscription.wait)
        _current_subscription.set(sub)
        try:
            if sub._on_start is not None:
                self._call_hook_thread(sub, sub._on_start, "on_start")
            while not sub._abandoned:
                item = q.get()
                if item is None:
                    break
                if isinstance(item, Outcome):  # Subscription.call: between two batches
                    item.settle(item.value)
                    continue
                batch, end = item
                self._handle_thread(sub, batch)
                if sub._on_batch_end is not None and not sub._abandoned:
                    self._call_hook_thread(
                        sub, sub._on_batch_end, "on_batch_end", quiet=_only_failures(batch)
                    )
                sub._t_done = end  # after the batch's publishes reached the intake
                if self._waiters or sub._stuck_call is not None or len(sub._buffer):
                    self._wake_from_thread()
            if sub._on_close is not None:
                self._call_hook_thread(sub, sub._on_close, "on_close")
        finally:
            sub._t_finished = True
            self._wake_from_thread()

    def _handle_thread(self, sub: Subscription, batch: list[Entry]) -> None:
        handler = sub.handler
        envelopes = sub.envelopes
        bus_id = self.bus_id
        timed = sub.timeout is not None
        started = time.perf_counter()
        for seq, event in batch:
            arg = Envelope(bus_id, seq, event) if envelopes else event
            sub._t_event = event
            sub._t_call_no = call = sub._t_call_no + 1
            sub._t_call_started = time.monotonic()
            error: BaseException | None = None
            try:
                handler(arg)
            except BaseException as exc:  # in its own thread, anything is its failure
                error = exc
            if self._call_ended(sub, call, timed):
                if sub._abandoned:
                    break  # closed while stuck: the rest was counted as dropped
                continue  # counted as failed when it was abandoned at its timeout
            if error is None:
                sub._t_delivered += 1
            else:
                self._failure(sub, event, error, thread=True)
        sub._t_event = None
        sub._t_seconds += time.perf_counter() - started

    @staticmethod
    def _call_ended(sub: Subscription, call: int, timed: bool) -> bool:
        """Mark the thread's call ``call`` as returned; True if it had been abandoned
        at its timeout (the loop counted it then)."""
        if not timed:  # nothing races: only a timeout abandons a call
            sub._t_call_started = None
            return False
        with sub._lock:
            sub._t_call_started = None
            return sub._stuck_call == call

    def _call_hook_thread(
        self, sub: Subscription, hook: Hook, label: str, *, quiet: bool = False
    ) -> None:
        sub._t_event = None
        sub._t_label = label
        sub._t_call_no = call = sub._t_call_no + 1
        sub._t_call_started = time.monotonic()
        error: BaseException | None = None
        try:
            if is_async_callable(hook):
                anyio.from_thread.run(hook, token=self._anyio_token)
            else:
                hook()
        except BaseException as exc:  # in its own thread, anything is its failure
            error = exc
        if not self._call_ended(sub, call, sub.timeout is not None) and error is not None:
            self._failure(sub, None, error, label, thread=True, quiet=quiet)

    def _check_thread(self, sub: Subscription, now: float) -> float:
        """Collect a finished batch, detect a call past its timeout; returns a deadline."""
        deadline = self._check_call(sub, now)
        end = sub._inflight_end
        if end is None:
            return deadline
        done = sub._t_done  # read before taking in what the batch published
        if done >= end:
            self._take_intake()
            sub._handled_upto = max(sub._handled_upto, done)
            sub._inflight_end = None
            return deadline
        if sub.timeout is not None and sub._t_call_started is None and not sub.stuck:
            deadline = min(deadline, now + sub.timeout)  # the batch's first call is due
        return deadline

    def _check_call(self, sub: Subscription, now: float) -> float:
        """Abandon a ``def`` call past its timeout (counted as failed, once)."""
        if sub._stuck_call is not None:
            if sub.stuck:
                return math.inf
            sub._stuck_call = None  # the hung call returned
        timeout, started = sub.timeout, sub._t_call_started
        if timeout is None or started is None:
            return math.inf
        if now - started < timeout:
            return started + timeout
        with sub._lock:
            if sub._t_call_started != started:  # it returned meanwhile
                return now
            sub._stuck_call = sub._t_call_no
            event, label = sub._t_event, sub._t_label
            if event is not None:
                sub._failed += 1
            else:
                sub._hook_failures += 1
        self._failure(
            sub,
            event,
            TimeoutError(f"def handler still running after {timeout}s; abandoned"),
            None if event is not None else label,
            count=False,
        )
        return math.inf

    def _abandon(self, sub: Subscription) -> None:
        """Give up on a stuck ``def`` subscriber at close: what it can no longer handle
        (the rest of its batch, its buffer) is counted as dropped, and its thread
        stops at the hung call, runs ``on_close`` and ends if that call returns."""
        with sub._lock:
            if not sub.stuck or sub._abandoned:
                return
            sub._abandoned = True
            rest = sub._buffer.take()
            sub._taken += len(rest)
            sub._dropped_stuck += max(0, sub._taken - sub._decided())

    # -- failures ----------------------------------------------------------------

    def _failure(
        self,
        sub: Subscription,
        event: Event | None,
        exc: BaseException,
        label: str | None = None,
        *,
        thread: bool = False,
        count: bool = True,
        quiet: bool = False,
    ) -> None:
        """Count, log and announce a failure. An event's failure counts in ``failed``,
        a hook's (``label``) in ``hook_failures``. ``quiet``: announce nothing (a
        failure over ``CallbackFailed`` events must not start a storm)."""
        sub.last_error = exc
        if count:
            if event is None:
                if thread:
                    sub._t_hook_failures += 1
                else:
                    sub._hook_failures += 1
            elif thread:
                sub._t_failed += 1
            else:
                sub._failed += 1
        hook = sub._label(event, label or "")
        event_type = type(event).__name__ if event is not None else ""
        error = describe(exc, timeout=sub.timeout)
        _log.warning(
            "callback failed",
            callback=sub.name,
            hook=hook,
            event_type=event_type,
            error=error,
            exc_info=exc,
        )
        if not quiet and not isinstance(event, CallbackFailed):
            self.publish(
                CallbackFailed(subscriber=sub.name, hook=hook, event_type=event_type, error=error)
            )


def _no_task() -> None:
    """trio has no task to cancel itself: nothing to undo there."""


def _self_cancel_error() -> BaseException:
    import asyncio

    return asyncio.CancelledError("the handler cancelled its own task")


async def _undo_self_cancel(task: Any, base: int, scope: anyio.CancelScope) -> None:
    """asyncio: withdraw the cancel requests a handler made on its own task.

    ``uncancel`` takes back the request, but before Python 3.13 a cancel that
    has not landed yet stays armed: let it land here, where it is caught. The
    bus's own cancellation of the subscriber (``scope``) still propagates.
    """
    import asyncio

    while task.cancelling() > base:
        task.uncancel()
    if scope.cancel_called:
        return
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        if scope.cancel_called:
            raise
        while task.cancelling() > base:
            task.uncancel()


def _only_failures(batch: list[Entry]) -> bool:
    return all(type(event) is CallbackFailed for _, event in batch)


def _check_handler(handler: Handler) -> None:
    if not callable(handler):
        raise TypeError(f"subscribe() takes a callable handler, got {handler!r}")
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None)
    except TypeError:
        raise TypeError(
            f"handler {_default_name(handler)}{sig} must accept one positional argument "
            "(the event); e.g. `async def handler(event): ...`"
        ) from None


def _default_name(handler: Any) -> str:
    while isinstance(handler, functools.partial):
        handler = handler.func
    owner = getattr(handler, "__self__", None)
    name = getattr(handler, "__name__", None)
    if name is None:  # a callable object
        return type(handler).__name__
    return f"{type(owner).__name__}.{name}" if owner is not None else str(name)


async def shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if the caller is cancelled, then re-raise that.

    anyio's shield covers anyio's cancellation; on asyncio a native
    ``task.cancel()`` (uvicorn's shutdown, a nested ``asyncio.timeout``) pierces
    it, so there ``coro`` runs in a task of its own behind ``asyncio.shield``.
    """
    cancel: BaseException | None = None
    with anyio.CancelScope(shield=True):
        if not hasattr(anyio.lowlevel.current_token().native_token, "call_soon_threadsafe"):
            return await coro  # trio: the shield is enough
        import asyncio

        task = asyncio.ensure_future(coro)
        while True:
            try:
                result = await asyncio.shield(task)
                break
            except asyncio.CancelledError as exc:
                if task.done():
                    raise
                cancel = exc
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
    if cancel is not None:
        raise cancel
    return result


def _absorb_native_cancel(exc: BaseException, deadline: float) -> bool:
    """True if ``exc`` is a native asyncio cancellation to hold until the drain ends.

    The task's cancel request is withdrawn (``uncancel``) so anyio's own scopes
    inside the drain keep working; the caller re-raises ``exc`` afterwards.
    """
    import asyncio

    if not isinstance(exc, asyncio.CancelledError) or time.monotonic() >= deadline:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


def _trio_soon(token: Any, fn: Callable[[], None]) -> None:
    token.run_sync_soon(fn, idempotent=True)
