"""The pump: one task per bus that walks new events into subscribers' buffers and
wakes the subscribers that are due; and the waiting that barriers, drain and
close do on it.

A *tick* (:meth:`Pump.tick`) takes in what other threads published, walks
every new event through the routes into buffers, collects finished ``def``
batches and detects calls past their timeout, reports lag, and wakes each idle
subscriber whose backlog reached ``batch_size`` or whose oldest pending event
is ``batch_delay`` old — at once while anyone waits (``hurry``). Each wake
hands the subscriber everything pending. It returns when it must look again.

The pump task sleeps until its doorbell rings (``Intake.ring``: a full batch
at publish, a foreign publish while its timer is not armed, a thread's
finished batch) or that deadline passes. While events flow it ticks every
``batch_delay`` instead of on every publish. ``docs/design.md`` ("How an
event travels") has the whole path.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import anyio
import anyio.lowlevel

from .._util.aio import LoopWaker
from .._util.log import get_logger
from ..errors import ChildTraceback
from ..events import CallbackFailed, Event, SubscriberLagged
from ..policies import Lossless
from ._delivery.base import Delivery
from ._delivery.failures import Kind
from ._intake import Intake
from ._routing import Routes

__all__ = ["Pump"]

_log = get_logger()


class Pump:
    """The engine behind one :class:`~evsys_async.bus.EventBus` (see the module
    docstring); implements :class:`~evsys_async.bus._delivery.base.Engine` for its deliveries.
    """

    def __init__(
        self,
        *,
        bus_id: str,
        batch_size: int,
        batch_delay: float,
        lag_threshold: int,
        close_timeout: float,
        on_interrupt: Callable[[BaseException], None],
    ) -> None:
        self.bus_id = bus_id
        self.batch_size = batch_size
        self.batch_delay = batch_delay
        self.lag_threshold = lag_threshold
        self.close_timeout = close_timeout
        self.intake = Intake(batch_size)
        self.routes = Routes()
        #: ended deliveries whose thread is still finishing its last batch
        self.closing: list[Delivery] = []
        self.walked = 0  # every event with seq < this has been routed
        self.token: anyio.lowlevel.EventLoopToken | None = None
        self.loop_thread: int | None = None
        #: from open() until the bus has closed: thread wakes are answered
        self.is_open = False
        self._on_interrupt = on_interrupt
        self._waiters = 0
        self._moved = False  # a poll changed what waiters see (a call abandoned)
        self._last_tick = -math.inf
        self._thread_wake_pending = False
        #: how often another thread woke the loop (a foreign publish, a thread's batch)
        self.thread_wakes = 0
        self._progress: anyio.Event | None = None
        self._doorbell: anyio.Event | None = None
        self._new_event: Callable[[], anyio.Event] = anyio.Event
        self._waker: LoopWaker | None = None

    def open(self) -> None:
        """On the event loop, as the bus opens."""
        self._waker = LoopWaker()
        self.token = self._waker.token
        self.loop_thread = threading.get_ident()
        # anyio.Event() looks the backend up on every call (~1.2 us); the backend's
        # own class, taken once here, does not. One is made per subscriber wake.
        self._new_event = type(anyio.Event())
        self._progress = self._new_event()
        self._doorbell = self._new_event()
        self.intake.open(self._doorbell, self.wake_from_thread)
        self.is_open = True

    # -- Engine ------------------------------------------------------------------

    @property
    def hurry(self) -> bool:
        return bool(self.intake.urgent)

    @property
    def watched(self) -> bool:
        return bool(self._waiters)

    def new_event(self) -> anyio.Event:
        return self._new_event()

    def notify(self) -> None:
        if self._waiters:
            self._progress.set()  # type: ignore[union-attr]
            self._progress = self._new_event()

    def arm(self, when: float) -> None:
        # make sure the pump ticks by `when` (whoever's tick woke the subscriber)
        if when < self.intake.deadline:
            self.intake.ring()

    def take_in(self) -> None:
        self.intake.take_foreign()

    def wake_from_thread(self) -> None:
        if self._thread_wake_pending:
            return
        self._thread_wake_pending = True
        self.thread_wakes += 1
        if self._waker is None or not self._waker.soon(self._on_thread_wake):
            self._thread_wake_pending = False  # the loop is gone; nothing to wake

    def _on_thread_wake(self) -> None:
        # Runs on the loop thread as a plain callback: must never raise.
        self._thread_wake_pending = False
        try:
            if self.is_open:
                self.intake.take_foreign()
                self.intake.ring()
            self.notify()
        except Exception:  # pragma: no cover - defensive: a wake callback must not raise
            _log.exception("bus wake callback failed")

    def publish(self, event: Event) -> int | None:
        """``EventBus.publish``: numbered here on the loop thread, taken in later
        from any other."""
        if threading.get_ident() != self.loop_thread:
            self.intake.put_foreign(event)
            return None
        return self.intake.put(event)

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
        """Tell the first failure of its kind (``_delivery/failures.py``): one WARNING
        line, the traceback as ``exc_info``, then ``CallbackFailed`` (``count`` 1);
        ``quiet``, or a failure over ``CallbackFailed`` itself, announces nothing (a
        broken sink must not start a storm)."""
        hook = delivery.label(event, slot)
        event_type = type(event).__name__ if event is not None else ""
        if error is None:
            error = delivery.describe(exc) if exc is not None else "(in its process)"
        _log.warning(
            "callback failed",
            callback=delivery.name,
            hook=hook,
            event_type=event_type,
            error=error,
            exc_info=exc,
        )
        if not quiet and not isinstance(event, CallbackFailed):
            cause = exc.__cause__ if exc is not None else None
            self._announce(
                CallbackFailed(
                    subscriber=delivery.name,
                    hook=hook,
                    event_type=event_type,
                    error=error,
                    # a child's traceback: its frames are nowhere else in this process
                    traceback=cause.text if isinstance(cause, ChildTraceback) else "",
                )
            )

    def failed_again(
        self, delivery: Delivery, kind: Kind, more: int, loud: int, since: float
    ) -> None:
        """Tell ``more`` failures of one kind in one line, without a traceback
        (``csv_metrics: 4,812 more RuntimeError in on_step_end since 12:00:01``), and
        announce the ``loud`` part of them as one ``CallbackFailed``."""
        at = time.strftime("%H:%M:%S", time.localtime(since))
        _log.warning(
            f"{delivery.name}: {more:,} more {kind.kind} in {kind.hook} since {at} "
            f"({kind.count:,} in all)"
        )
        if loud:
            self._announce(
                CallbackFailed(
                    subscriber=delivery.name,
                    hook=kind.hook,
                    event_type=kind.event_type,
                    error=kind.error,
                    count=loud,
                )
            )

    def _announce(self, event: CallbackFailed) -> None:
        """Publish a failure while the bus takes events (at its close the log says it)."""
        if self.intake.accepting:
            self.publish(event)

    def interrupt(self, delivery: Delivery, exc: BaseException) -> None:
        if delivery.on_interrupt is not None:
            try:
                delivery.on_interrupt(exc)
            except Exception:  # pragma: no cover - the owner's hook must not raise
                _log.exception("on_interrupt failed", subscriber=delivery.name)
            return
        self._on_interrupt(exc)

    # -- the pump task -----------------------------------------------------------

    async def run(self, scope: anyio.CancelScope) -> None:
        """The pump task; ends when ``scope`` (shielded) is cancelled at close."""
        intake = self.intake
        next_deadline = math.inf
        with scope:
            while True:
                # the fallback fires one batch_delay late, so that a publish usually
                # finds the batch due first (Intake.put)
                delay = next_deadline + self.batch_delay - time.monotonic()
                if delay > 0:
                    with anyio.move_on_after(delay):
                        await self._doorbell.wait()  # type: ignore[union-attr]
                else:  # due already: still let the subscribers run between two ticks
                    await anyio.lowlevel.checkpoint()
                if intake.due:
                    self._doorbell = self._new_event()
                    intake.reset_doorbell(self._doorbell)
                walked = self.walked
                intake.deadline = math.inf  # this tick decides the next one
                next_deadline = self.tick()
                if self.walked != walked:
                    # events are flowing: tick again after batch_delay instead of being
                    # woken by every publish (publish still rings for a full batch)
                    next_deadline = min(next_deadline, time.monotonic() + self.batch_delay)
                intake.deadline = next_deadline
                # publish may rely on the timer only if it fires within a batch delay;
                # a def handler's timeout may be far away
                intake.timer_armed = next_deadline <= time.monotonic() + self.batch_delay
                if not intake.timer_armed and intake.has_foreign():
                    # a thread published while the timer was still armed and so did
                    # not wake the loop (Intake.put_foreign): take it in now
                    intake.ring()

    def tick(self) -> float:
        """Walk, collect, wake (see the module docstring); the earliest deadline at
        which a subscriber falls due. Waiters are told only when something moved:
        telling them on every tick would have them tick again, and again, holding
        the GIL from the very threads they wait for."""
        intake = self.intake
        intake.take_foreign()
        moved = False
        if intake.new:
            new, intake.new = intake.new, []
            self.walked = self.routes.walk(new, self.walked)
            moved = True
        now = time.monotonic()
        walked = self.walked
        hurry = intake.urgent
        deadline = math.inf
        lagged: SubscriberLagged | None = None
        if self.closing:  # ended def subscribers still finishing their last batch
            still = [d for d in self.closing if not d.closed]
            moved |= len(still) != len(self.closing)
            self.closing = still
            for d in still:
                deadline = min(deadline, self._poll(d, now))
        for d in self.routes.active:
            handled = d.handled_upto
            deadline = min(deadline, self._poll(d, now))
            n = len(d.buffer)
            if n > d.max_pending:
                d.max_pending = n
            if lagged is None and (n or d.arrivals):  # a lossless one counts no arrivals
                lagged = self._lag(d, n)
            if not d.idle:
                if n and not d.is_async:
                    # its thread is busy and more waits: look again soon (its finished
                    # batch is collected lazily; a task re-arms itself)
                    deadline = min(deadline, now + self.batch_delay)
            elif n == 0:
                d.handled_upto = walked
            else:
                first = d.first_pending
                if first is None:
                    # its oldest event came after the previous tick, at the earliest
                    d.first_pending = first = self._last_tick
                if hurry or n >= d.batch_size or now - first >= self.batch_delay:
                    d.wake()
                else:
                    deadline = min(deadline, first + self.batch_delay)
            moved |= d.handled_upto != handled
        self._last_tick = now
        if lagged is not None and intake.accepting:
            self.publish(lagged)
        if moved or self._moved:
            self._moved = False
            self.notify()
        return deadline

    def add(self, d: Delivery) -> None:
        """A new subscriber's delivery joins the routes (on the loop thread)."""
        self.routes.add(d)
        self._retune()

    def remove(self, d: Delivery) -> None:
        """An unsubscribed delivery leaves the routes."""
        self.routes.remove(d)
        self._retune()

    def _retune(self) -> None:
        # a publish rings the pump when the smallest batch falls due: ringing at every
        # batch_size publishes would tick for subscribers that wait for more
        active = self.routes.active
        self.intake.batch_size = min((d.batch_size for d in active), default=self.batch_size)

    def _poll(self, d: Delivery, now: float) -> float:
        stuck = d.stuck
        deadline = d.poll(now)
        if d.stuck != stuck:  # abandoned at its timeout: no longer waited for
            self._moved = True
        return deadline

    def _lag(self, d: Delivery, pending: int) -> SubscriberLagged | None:
        """``SubscriberLagged`` when a lossless backlog (or a bounded subscriber's
        arrivals since its last take) first crosses ``lag_threshold`` and at each
        doubling, or when a bound first forces a drop (and at each doubling)."""
        if isinstance(d.policy, Lossless):
            count = pending
        else:
            forced = d.buffer.forced  # coalescing is not lag: only forced drops
            if forced >= d.drop_mark:
                d.drop_mark = max(d.drop_mark, forced) * 2
                return SubscriberLagged(
                    subscriber=d.name, pending=pending, dropped=d.buffer.dropped
                )
            count = d.arrivals
        mark = d.lag_mark or self.lag_threshold
        if count < mark:
            return None
        while mark <= count:  # one report per crossing, even across several doublings
            mark *= 2
        d.lag_mark = mark
        return SubscriberLagged(subscriber=d.name, pending=pending, dropped=d.buffer.dropped)

    # -- waiting -----------------------------------------------------------------

    async def wait_until(self, done: Callable[[], bool], timeout: float | None) -> bool:
        """Wait, hurrying every subscriber, until ``done()``; ``False`` at the timeout.
        Cancellation-safe: nothing changes for the subscribers."""
        self._waiters += 1
        self.intake.urgent += 1
        try:
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                while True:
                    self.tick()
                    if done():
                        return True
                    await self._progress.wait()  # type: ignore[union-attr]
            self.tick()
            return done()
        finally:
            self._waiters -= 1
            self.intake.urgent -= 1
