"""ThreadDelivery: a ``def`` handler runs in a daemon thread of its own, fed in batches.

One dedicated thread per subscriber for its whole life: order holds, a
callback that needs a fixed thread (sqlite3, a GUI toolkit) has one, a hung
handler starves nobody (no shared pool), and a daemon never holds the process
open. In the thread anything the handler raises, ``BaseException`` included,
is its failure.

A call past ``timeout`` cannot be cancelled: it is *abandoned* — counted as
failed once, no longer waited for by barriers, drain or close (``stuck``); the
next call waits for it to return (order holds). At close a stuck delivery's
remaining events are counted as dropped and its thread stops at the hung
call: when (if ever) it returns, ``on_close`` runs and the thread ends.

The loop collects a finished batch lazily, at the next pump tick, unless a
barrier waits: each cross-thread wake in a sleeping step can cost up to a
millisecond on asyncio (docs/design.md, "Threads and tasks").
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio.abc
import anyio.from_thread

from ..._util.aio import is_async_callable
from ..._util.worker import Outcome
from ...errors import BusClosedError
from ...events import Envelope, Event
from ...policies import Entry
from .base import Delivery, Hook, current_delivery, only_failures, thread_local

__all__ = ["ThreadDelivery"]

T = TypeVar("T")


class _Call:
    """``Subscription.call``: run ``fn`` in the thread between two batches."""

    __slots__ = ("fn", "outcome")

    def __init__(self, fn: Callable[[], Any], outcome: Outcome) -> None:
        self.fn, self.outcome = fn, outcome


#: what the thread takes: a batch and the walk position it ends at, a call, or None (end)
_Item = tuple[list[Entry], int] | _Call | None


class ThreadDelivery(Delivery):
    """A subscriber whose handler is ``def``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # a hand-over to a thread costs a GIL round trip (and the GIL waits up to the
        # switch interval): 4x larger batches; events still wait at most batch_delay
        self.batch_size = self.engine.batch_size * 4
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._inflight_end: int | None = None  # the walk position the batch in hand ends at
        self._stuck_call: int | None = None  # the call number abandoned at its timeout
        self._abandoned = False  # closed while stuck: the thread stops at the hung call
        # settles a call's return (thread) against its abandonment at the timeout (loop)
        self._lock = threading.Lock()
        # written by the thread only
        self._done = 0  # the walk position of the last batch finished
        self._call_no = 0  # numbers every handler or hook call in the thread
        self._call_started: float | None = None  # set while a call runs
        self._call_event: Event | None = None  # the event of that call (None: a hook)
        self._call_slot = ""  # the hook slot of that call, when not an event's
        self._finished = False
        self._thread = threading.Thread(
            target=self._main, name=f"evsys-sub:{self.name}", daemon=True
        )

    # -- what the pump calls (loop thread) ---------------------------------------

    def start(self, task_group: anyio.abc.TaskGroup) -> None:
        self._done = self.engine.walked
        self._thread.start()

    @property
    def idle(self) -> bool:
        return self._inflight_end is None

    def wake(self) -> None:
        if self._inflight_end is None and len(self.buffer) and not self.closing:
            self._hand_over()

    def _hand_over(self) -> None:
        end = self.engine.walked
        self._inflight_end = end
        self._queue.put((self.take(), end))
        if self.timeout is not None:
            self.engine.arm(time.monotonic() + self.timeout)

    def begin_close(self) -> None:
        """The thread handles what it holds, runs ``on_close``, then ends; its last
        calls stay under the handler's timeout (see :meth:`poll`)."""
        self.closing = True
        if self._finished:
            return
        if len(self.buffer):
            if self._inflight_end is None:
                self._hand_over()
            else:  # queued behind the batch in hand; poll collects the later end
                end = self.engine.walked
                self._queue.put((self.take(), end))
                self._inflight_end = end
        self._queue.put(None)

    @property
    def closed(self) -> bool:
        return self._finished

    @property
    def stuck(self) -> bool:
        # read the thread's state now: the hung call may have returned since the last tick
        call = self._stuck_call
        return (
            call is not None
            and not self._finished
            and self._call_no == call
            and self._call_started is not None
        )

    def poll(self, now: float) -> float:
        deadline = self._check_call(now)
        end = self._inflight_end
        if end is None:
            return deadline
        if self._done >= end:
            self.engine.take_in()  # what the batch published is numbered before it counts done
            self.handled_upto = max(self.handled_upto, end)
            self._inflight_end = None
            return deadline
        if self.timeout is not None and self._call_started is None and not self.stuck:
            deadline = min(deadline, now + self.timeout)  # the batch's first call is due
        return deadline

    def _check_call(self, now: float) -> float:
        """Abandon a call past its timeout (counted as failed, once)."""
        if self._stuck_call is not None:
            if self.stuck:
                return math.inf
            self._stuck_call = None  # the hung call returned
        timeout, started = self.timeout, self._call_started
        if timeout is None or started is None:
            return math.inf
        if now - started < timeout:
            return started + timeout
        with self._lock:
            if self._call_started != started:  # it returned meanwhile
                return now
            self._stuck_call = self._call_no
            event, slot = self._call_event, self._call_slot
            error = TimeoutError(f"def handler still running after {timeout}s; abandoned")
            self.tally(event, error, slot)
        self.book.record(event, error, slot, False)
        return math.inf

    def cancel(self) -> None:
        """A thread cannot be cancelled: a stuck one is abandoned instead."""

    def abandon(self) -> None:
        with self._lock:
            if not self.stuck or self._abandoned:
                return
            self._abandoned = True
            rest = self.buffer.take()
            self.taken += len(rest)
            self.dropped_stuck += max(0, self.taken - self.decided())

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` in the thread between two batches; waits for a hung handler to
        return (cancel the call to stop waiting). Raises what ``fn`` raised, or
        :class:`BusClosedError` if the thread has ended."""
        if self._finished:
            raise BusClosedError(f"subscriber {self.name!r} has ended; its thread is gone")
        outcome = Outcome.new()
        self._queue.put(_Call(fn, outcome))
        result: T = await outcome.result()
        return result

    # -- the thread --------------------------------------------------------------

    def _main(self) -> None:
        thread_local.delivery = self
        # from_thread.run copies this thread's context: drain/publish_and_wait called
        # from the handler then skip the caller (see Subscription.wait)
        current_delivery.set(self)
        engine = self.engine
        get = self._queue.get
        try:
            self._begin()
            if self.on_start is not None:
                self._call_hook(self.on_start, "on_start")
            self._started()
            while not self._abandoned:
                item = get()
                if item is None:
                    break
                if isinstance(item, _Call):  # Subscription.call: between two batches
                    self._run_call(item.fn, item.outcome)
                    continue
                batch, end = item
                if self.disabled is None:
                    self._handle(batch)
                else:
                    self.drop_rest(batch, 0)
                if self.on_batch_end is not None and not self._abandoned and not self.disabled:
                    self._call_hook(self.on_batch_end, "on_batch_end", quiet=only_failures(batch))
                self._done = end  # after the batch's publishes reached the intake
                # collected lazily, at the next pump tick (a publish of a full batch or
                # the timer), unless someone waits: a cross-thread wake inside a
                # sleeping step costs the step (docs/design.md, "Threads and tasks")
                if engine.watched or self._stuck_call is not None:
                    engine.wake_from_thread()
            if self.on_close is not None:
                self._call_hook(self.on_close, "on_close")
        finally:
            self._end()
            self.tell_failures()
            self._finished = True
            engine.wake_from_thread()

    # -- seams a subclass fills (the process delivery: ``process.py``) ------------

    def _begin(self) -> None:
        """In the thread, before ``on_start``."""

    def _started(self) -> None:
        """In the thread, after ``on_start``, before the first batch."""

    def _run_call(self, fn: Callable[[], Any], outcome: Outcome) -> None:
        """``Subscription.call``: run ``fn`` here and hand its result to ``outcome``."""
        outcome.settle(fn)

    def _end(self) -> None:
        """In the thread, last (also when it fails)."""

    def _handle(self, batch: list[Entry]) -> None:
        started = time.perf_counter()
        if self.timeout is None:
            self._handle_untimed(batch)
        else:
            self._handle_timed(batch)
        self.seconds += time.perf_counter() - started

    def _handle_untimed(self, batch: list[Entry]) -> None:
        # nothing abandons a call without a timeout: no clock, no lock per call
        if self.envelopes:
            self._handle_envelopes(batch)
            return
        handler = self.handler
        for seq, event in batch:
            try:
                handler(event)
            except BaseException as exc:  # in its own thread, anything is its failure
                if self._failed_in_batch(batch, seq, event, exc):
                    break
            else:
                self.delivered += 1

    def _handle_envelopes(self, batch: list[Entry]) -> None:
        handler, bus_id = self.handler, self.engine.bus_id
        for seq, event in batch:
            try:
                handler(Envelope(bus_id, seq, event))
            except BaseException as exc:  # in its own thread, anything is its failure
                if self._failed_in_batch(batch, seq, event, exc):
                    break
            else:
                self.delivered += 1

    def _failed_in_batch(
        self, batch: list[Entry], seq: int, event: Event, exc: BaseException
    ) -> bool:
        """Count event ``seq``'s failure; True if that disabled the subscriber (too many
        failures in a row: the rest of the batch is dropped)."""
        self.count_failure(event, exc, "")
        if self.disabled is None:
            return False
        self.drop_after(batch, seq)
        return True

    def _handle_timed(self, batch: list[Entry]) -> None:
        handler = self.handler
        envelopes = self.envelopes
        bus_id = self.engine.bus_id
        for seq, event in batch:
            arg = Envelope(bus_id, seq, event) if envelopes else event
            self._call_event = event
            self._call_no = call = self._call_no + 1
            self._call_started = time.monotonic()
            error: BaseException | None = None
            try:
                handler(arg)
            except BaseException as exc:  # in its own thread, anything is its failure
                error = exc
            if self._call_ended(call, True):
                if self._abandoned:
                    break  # closed while stuck: the rest was counted as dropped
                if self.disabled is not None:  # that timeout was one too many
                    self.drop_after(batch, seq)
                    break
                continue  # counted as failed when it was abandoned at its timeout
            if error is None:
                self.delivered += 1
            elif self._failed_in_batch(batch, seq, event, error):
                break
        self._call_event = None

    def _call_ended(self, call: int, timed: bool) -> bool:
        """Mark call ``call`` as returned; True if it had been abandoned at its timeout
        (the loop counted it then)."""
        if not timed:  # nothing races: only a timeout abandons a call
            self._call_started = None
            return False
        with self._lock:
            self._call_started = None
            return self._stuck_call == call

    def _call_hook(self, hook: Hook, slot: str, *, quiet: bool = False) -> None:
        self._call_event = None
        self._call_slot = slot
        self._call_no = call = self._call_no + 1
        self._call_started = time.monotonic()
        error: BaseException | None = None
        try:
            if is_async_callable(hook):
                anyio.from_thread.run(hook, token=self.engine.token)
            else:
                hook()
        except BaseException as exc:  # in its own thread, anything is its failure
            error = exc
        if not self._call_ended(call, self.timeout is not None) and error is not None:
            self.count_failure(None, error, slot, quiet=quiet)

    def count_failure(
        self, event: Event | None, exc: BaseException, slot: str = "", *, quiet: bool = False
    ) -> None:
        if self.timeout is None:
            self.tally(event, exc, slot)
        else:
            with self._lock:  # the loop counts an abandoned call under it too
                self.tally(event, exc, slot)
        self.book.record(event, exc, slot, quiet)

    def drop_rest(self, batch: list[Entry], start: int) -> None:
        with self._lock:  # abandon (the loop) counts drops under it too
            super().drop_rest(batch, start)
