"""EventBus: publish typed events; every subscriber handles them in its own task or thread.

How an event travels (``docs/design.md`` has the whole story):

1. ``publish`` (any thread) appends the event to the bus's intake
   (``_intake.py``): O(1) whatever the number of subscribers, never awaits,
   never raises because of a subscriber. On the loop thread the event is
   numbered at once; from another thread when the loop takes it in.
2. The pump (``_pump.py``), one task per bus, walks new events through the
   type -> subscribers routes (``_routing.py``) into each matching
   subscriber's buffer, built by its policy (``policies.py``).
3. A subscriber is woken when its backlog reaches its batch (four times
   ``batch_size``) or its oldest pending event is ``batch_delay`` old, and at
   once while a barrier, ``drain`` or close waits. Each wake hands it
   everything pending, as one batch, to its delivery (``_delivery/``): an
   ``async def`` handler runs in its own task, a ``def`` handler in its own
   daemon thread, one call at a time, and with ``isolation="process"`` either
   runs in a child process of its own.

Guarantees: each subscriber sees its events in publish order; a handler that
raises, hangs or is slow stalls neither the publisher nor its siblings; a
``Lossless`` subscriber never loses an event while the bus is open, and
leaving ``async with`` drains (shielded) before anything is cancelled.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc

from .._util.aio import Deadline, absorb_native_cancel
from .._util.log import get_logger
from ..errors import BusClosedError
from ..events import Event
from ..policies import Policy
from ._delivery.base import Delivery, Handler, Hook
from ._pump import Pump
from ._subscribe import Isolation, SubscribeOptions, default_name, plan
from ._subscribers import Subscribers
from .subscription import DrainReport, SubscriberStats, Subscription, stats_of

__all__ = ["EventBus"]

_log = get_logger()


class EventBus:
    """An in-process async event bus for asyncio and trio.

    Use it as an async context manager; it owns its subscriber tasks and
    threads. ``batch_size`` and ``batch_delay`` set when an idle subscriber is
    woken (see the module docstring): when its backlog reaches four times
    ``batch_size`` (a wake costs a task switch or a thread hand-over, more
    than a few handler calls), or its oldest pending event is ``batch_delay``
    old; ``lag_threshold`` when ``SubscriberLagged`` is published;
    ``close_timeout`` bounds the drain when the block is left.
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
        self.lag_threshold = lag_threshold
        self.batch_size = batch_size
        self.batch_delay = batch_delay
        self._pump = Pump(
            bus_id=self.bus_id,
            batch_size=batch_size,
            batch_delay=batch_delay,
            lag_threshold=lag_threshold,
            close_timeout=close_timeout,
            on_interrupt=self._interrupt,
        )
        self._intake = self._pump.intake
        self._subscribers = Subscribers(self._pump)
        self._loop_thread: int | None = None
        self._state = "new"  # new -> open -> closed
        self._tg: anyio.abc.TaskGroup | None = None
        self._pump_scope = anyio.CancelScope(shield=True)
        #: KeyboardInterrupt/SystemExit from a handler without an owner: raised at exit
        self._interrupted: BaseException | None = None

    @property
    def close_timeout(self) -> float:
        """Bounds the drain when the block is left (settable until then)."""
        return self._pump.close_timeout

    @close_timeout.setter
    def close_timeout(self, value: float) -> None:
        self._pump.close_timeout = value

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise BusClosedError("an EventBus can be entered once; create a new one")
        self._pump.open()
        self._loop_thread = self._pump.loop_thread
        self._tg = tg = anyio.create_task_group()
        await tg.__aenter__()
        self._state = "open"
        # Subscriber tasks and the pump are shielded from the block's cancellation
        # (they must drain first); close cancels them through their own scopes.
        tg.start_soon(self._pump.run, self._pump_scope, name="evsys-bus-pump")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None  # entered
        try:
            await self._close()
        finally:
            self._pump_scope.cancel()
            for d in self._subscribers.all():
                d.cancel()
            tg.cancel_scope.cancel()
            # the block's own error propagates as is, not wrapped in an ExceptionGroup
            own_error = exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class())
            args = (None, None, None) if own_error else (exc_type, exc, tb)
            result: bool | None = await tg.__aexit__(*args)
        if self._interrupted is not None:  # a handler's KeyboardInterrupt/SystemExit
            raise self._interrupted
        return None if own_error else result

    async def _close(self) -> None:
        """Drain under ``close_timeout`` (shielded, also from a native asyncio cancel),
        end every subscription, wait for them, log what was left."""
        pump = self._pump
        deadline = Deadline(pump.close_timeout)
        native_cancel: BaseException | None = None

        async def hold(wait: Callable[[], Any]) -> Any:
            nonlocal native_cancel
            while True:
                try:
                    return await wait()
                except BaseException as exc:
                    # A native asyncio cancellation (uvicorn's shutdown, a nested
                    # asyncio.timeout) pierces anyio's shield: finish the wait first.
                    if not absorb_native_cancel(exc, deadline):
                        raise
                    native_cancel = exc

        try:
            with anyio.CancelScope(shield=True):
                report = await hold(lambda: self.drain(timeout=deadline.left()))
                self._intake.stop_accepting()  # from here on a publish is dropped
                pump.tick()
                subscribers = self._subscribers
                subscribers.end_all()
                await hold(lambda: pump.wait_until(subscribers.all_ended, deadline.left()))
                self._close_state()  # before the report: late publishes count as dropped
                subscribers.abandon_the_rest()
                if not report.ok:
                    _log.warning("bus drain deadline passed", pending=report.pending)
        finally:
            self._close_state()  # also when a native cancel past the deadline ends it
        if native_cancel is not None:
            raise native_cancel

    def _close_state(self) -> None:
        self._intake.close()
        self._pump.is_open = False
        self._state = "closed"

    def _interrupt(self, exc: BaseException) -> None:
        """A handler with no owner raised ``KeyboardInterrupt``/``SystemExit``: cancel
        the block; the exception is raised when it is left (after the drain)."""
        if self._interrupted is None and self._tg is not None:
            self._interrupted = exc
            self._tg.cancel_scope.cancel()

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
        isolation: Isolation | None = None,
        on_start: Hook | None = None,
        on_batch_end: Hook | None = None,
        on_close: Hook | None = None,
        hook_name: Callable[[Event | str], str] | None = None,
        on_request: Callable[[bytes], None] | None = None,
        sync: bool | None = None,
        requires_start: bool = False,
        max_consecutive_failures: int | None = None,
    ) -> Subscription:
        """Add a subscriber; it sees matching events published from now on.

        ``events`` matches by type, subclasses included. ``handler`` takes one
        argument (the event, or an :class:`Envelope` with ``envelopes=True``).
        ``run_key`` keeps the events of that run and the run-less ones.
        ``on_start``/``on_batch_end``/``on_close`` run where the handler runs,
        before the first event, after each batch, after the last.
        ``hook_name(event_or_slot)`` names the hook in failure logs (the slot is
        ``"on_start"``, ``"on_batch_end"`` or ``"on_close"`` for those).
        ``timeout`` bounds each call: an async call is cancelled, a ``def``
        call abandoned; both count as failed.

        ``isolation`` says where the handler runs, decided once, here:
        ``"task"`` (on the event loop; the default for ``async def``),
        ``"thread"`` (its own daemon thread; the default for ``def``) or
        ``"process"``: a child process of its own, fed msgpack-encoded events
        in batches, where it runs in a thread (``def``) or on an event loop of
        this backend (``async def``). The handler and the hooks are then
        pickled here, once; ``on_request(message)`` gets, in this process and
        in the subscriber's feeder thread, the bytes the child sends with
        :func:`~evsys_async.bus.request_parent`, before the batch in hand
        counts as done. See ``docs/isolation.md``. ``sync`` is the older
        spelling of the same choice, still accepted: ``sync=True`` is
        ``"thread"``, ``sync=False`` is ``"task"``, taken as given (a ``def``
        that returns an awaitable is awaited); beside ``"process"`` it says how
        the handler runs in its process.

        Nothing the handler raises leaves its subscriber: an exception, a stray
        cancellation (one this bus did not cause) and, in a ``def`` handler's
        thread, any ``BaseException`` are counted as its failure, and it goes on
        with its next event. Failing is cheap: the first failure of each kind
        (hook, exception type) is logged with its traceback and announced as
        ``CallbackFailed``; later ones are counted and told in summaries at
        growing intervals, and at a drain and the subscriber's end
        (``docs/isolation.md``). ``KeyboardInterrupt``/``SystemExit`` from
        an ``async def`` handler (on the event loop's thread) also ask to stop:
        the bus cancels its ``async with`` block and re-raises the exception
        after the drain.

        A subscriber can be *disabled* for good: its handler and ``on_batch_end``
        are not called again (``on_close`` still runs), its later events count
        as dropped, and ``SubscriberStats.disabled`` says why. With
        ``requires_start=True`` that happens when ``on_start`` raised (the handler
        never runs on a half-built object); with ``max_consecutive_failures=n``
        after ``n`` failed events in a row. By default neither.

        Raises ``TypeError`` for a handler that cannot take one argument, a
        non-``Event`` type, a ``"process"`` handler or hook that cannot be
        pickled, or an ``isolation`` that contradicts ``sync`` or the handler
        (``"task"`` for a ``def``), or a ``"process"`` handler defined in
        ``__main__`` of a notebook or ``python -c`` (its process could not import
        it); ``ValueError`` for an unknown ``isolation`` or a
        ``max_consecutive_failures`` below 1; :class:`BusClosedError` outside the
        bus's block;
        ``RuntimeError`` off the bus's event loop thread.
        """
        options = SubscribeOptions(
            events=tuple(events),
            policy=policy,
            name=name,
            timeout=timeout,
            envelopes=envelopes,
            run_key=run_key,
            isolation=isolation,
            sync=sync,
            on_start=on_start,
            on_batch_end=on_batch_end,
            on_close=on_close,
            hook_name=hook_name,
            on_request=on_request,
            requires_start=requires_start,
            max_consecutive_failures=max_consecutive_failures,
        )
        return self.subscribe_with(handler, options)

    def subscribe_with(self, handler: Handler, options: SubscribeOptions) -> Subscription:
        """The package's own way in: :meth:`subscribe`'s arguments as one record, which
        may also carry ``on_interrupt`` (the loop's; see ``SubscribeOptions``, a
        private record that may change: use :meth:`subscribe`). Same checks, errors."""
        if self._state != "open":
            raise BusClosedError(
                "subscribe() needs an open bus: call it inside `async with EventBus() as bus:`"
            )
        if threading.get_ident() != self._loop_thread:
            raise RuntimeError(
                "subscribe() must be called on the bus's event loop thread; from a worker "
                "thread use anyio.from_thread.run_sync(bus.subscribe, ...)"
            )
        assert self._tg is not None  # open
        planned = plan(handler, options)
        pump = self._pump
        subscribers = self._subscribers
        unique = subscribers.unique_name(options.name or default_name(handler))
        try:
            d = planned.build(pump, unique)
        except BaseException:
            subscribers.release(unique)  # refused: the name is free again
            raise
        pump.tick()  # what was published before subscribe is not this subscriber's
        d.handled_upto = pump.walked
        pump.add(d)
        d.start(self._tg)
        return Subscription(d, pump, subscribers.unsubscribe)

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
            if self._loop_thread is None:
                raise BusClosedError(
                    "publish() before the bus was entered: use `async with EventBus() as bus:`"
                )
            self._intake.put_foreign(event)
            return None
        return self._intake.put(event)

    # -- waiting -----------------------------------------------------------------

    async def publish_and_wait(self, event: Event, timeout: float | None = 5.0) -> DrainReport:
        """Publish ``event`` and wait until every matching subscriber handled it.

        Returns a report naming those that had not when ``timeout`` passed; it
        does not raise on the deadline. Called from inside a handler, it does
        not wait for the calling subscriber.
        """
        if not self._intake.accepting:
            raise BusClosedError(
                "publish_and_wait() needs an open bus: call it inside `async with EventBus()`"
            )
        seq = self.publish(event)
        if seq is None:
            raise RuntimeError("publish_and_wait() must be awaited on the bus's event loop")
        pump = self._pump
        pump.tick()
        waiting = [d for d in pump.routes.of(type(event)) if d.accepts(event)]
        await pump.wait_until(lambda: all(d.reached(seq) for d in waiting), timeout)
        return _report(waiting, seq)

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
        calling subscriber are not waited for. Once quiet, the failures that no
        summary told yet are told (and what that announces is drained too), so a
        drain leaves nothing unreported. Cancellation-safe.
        """
        pump, intake = self._pump, self._intake
        chosen = None if subscriptions is None else self._subscribers.of(subscriptions)
        deadline = Deadline(timeout)

        def subs() -> list[Delivery]:
            return pump.routes.active if chosen is None else chosen

        def quiet() -> bool:
            intake.take_foreign()
            if intake.new or intake.has_foreign():
                return False
            # handled_upto == walked implies an empty buffer: entries are all < walked
            return all(d.reached(pump.walked - 1) for d in subs())

        await pump.wait_until(quiet, deadline.remaining())
        # a summary's CallbackFailed is drained too; a failure handling it announces
        # nothing, so this ends after two rounds at most
        for _ in range(3):
            told = [d for d in subs() if d.tell_failures()]
            if not told or deadline.passed:
                break
            await pump.wait_until(quiet, deadline.remaining())
        return _report(subs(), pump.walked - 1)

    # -- stats -------------------------------------------------------------------

    def stats(self) -> dict[str, SubscriberStats]:
        """``{name: SubscriberStats}`` for every subscriber, the latest 256 ended ones
        included (a long-lived bus lets older ones go, and their names).

        On the loop thread it first takes in everything published so far, so
        the counts are current at the call.
        """
        if threading.get_ident() == self._loop_thread and self._state == "open":
            self._pump.tick()
        return {d.name: stats_of(d) for d in self._subscribers.all()}

    @property
    def last_seq(self) -> int:
        """The sequence number of the latest event numbered so far (-1 before any)."""
        return self._intake.next_seq - 1

    @property
    def dropped_after_close(self) -> int:
        """Events published after the bus closed (counted, logged once, not delivered)."""
        return self._intake.dropped_after_close


def _report(deliveries: list[Delivery], seq: int) -> DrainReport:
    pending = {d.name: d.pending() for d in deliveries if not d.reached(seq)}
    stuck = tuple(d.name for d in deliveries if d.stuck)
    return DrainReport(ok=not pending, pending=pending, stuck=stuck)
