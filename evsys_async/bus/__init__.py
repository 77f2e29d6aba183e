"""EventBus: publish typed events; every subscriber handles them in its own task or thread.

How an event travels (``docs/design.md`` has the whole story):

1. ``publish`` (any thread) appends the event to the bus's intake
   (``_intake.py``): O(1) whatever the number of subscribers, never awaits,
   never raises because of a subscriber. On the loop thread the event is
   numbered at once; from another thread when the loop takes it in.
2. The pump (``_pump.py``), one task per bus, walks new events through the
   type -> subscribers routes (``_routing.py``) into each matching
   subscriber's buffer, built by its policy (``policies.py``).
3. A subscriber is woken when its backlog reaches ``batch_size`` or its
   oldest pending event is ``batch_delay`` old, and at once while a barrier,
   ``drain`` or close waits. Each wake hands it everything pending, as one
   batch, to its delivery (``_delivery/``): an ``async def`` handler runs in
   its own task, a ``def`` handler in its own daemon thread, one call at a time,
   and with ``isolation="process"`` either runs in a child process of its own.

Guarantees: each subscriber sees its events in publish order; a handler that
raises, hangs or is slow stalls neither the publisher nor its siblings; a
``Lossless`` subscriber never loses an event while the bus is open, and
leaving ``async with`` drains (shielded) before anything is cancelled.
"""

from __future__ import annotations

import functools
import inspect
import threading
import uuid
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, Literal, Self

import anyio

from .._util.aio import Deadline, absorb_native_cancel, is_async_callable, on_asyncio
from .._util.log import get_logger
from ..errors import BusClosedError
from ..events import Event
from ..policies import DropOldest, Latest, Lossless, Policy
from ._delivery.base import Delivery, Handler, Hook
from ._delivery.child import in_subscriber_process, request_parent
from ._delivery.process import ProcessDelivery
from ._delivery.task import TaskDelivery
from ._delivery.thread import ThreadDelivery
from ._pump import Pump
from .subscription import DrainReport, SubscriberStats, Subscription, stats_of

__all__ = [
    "DrainReport",
    "EventBus",
    "Isolation",
    "SubscriberStats",
    "Subscription",
    "in_subscriber_process",
    "request_parent",
]

#: where a subscriber's handler runs: a task, a thread, or a child process of its own
Isolation = Literal["task", "thread", "process"]
_ISOLATIONS = ("task", "thread", "process")

_log = get_logger()

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
        self._ended: list[Delivery] = []  # unsubscribed; kept for stats
        self._names: set[str] = set()
        self._loop_thread: int | None = None
        self._state = "new"  # new -> open -> closed
        self._tg: Any = None
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
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._state = "open"
        # Subscriber tasks and the pump are shielded from the block's cancellation
        # (they must drain first); close cancels them through their own scopes.
        self._tg.start_soon(self._pump.run, self._pump_scope, name="evsys-bus-pump")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        try:
            await self._close()
        finally:
            self._pump_scope.cancel()
            for d in self._deliveries():
                d.cancel()
            self._tg.cancel_scope.cancel()
            # the block's own error propagates as is, not wrapped in an ExceptionGroup
            own_error = exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class())
            args = (None, None, None) if own_error else (exc_type, exc, tb)
            result: bool | None = await self._tg.__aexit__(*args)
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
                for d in list(pump.routes.active):
                    self._unsubscribe(d)
                ended = self._ended
                await hold(
                    lambda: pump.wait_until(
                        lambda: all(d.closed or d.stuck for d in ended), deadline.left()
                    )
                )
                self._close_state()  # before the report: late publishes count as dropped
                for d in ended:
                    d.abandon()
                    if d.pending() or d.stuck or not d.closed:
                        _log.warning(
                            "bus closed with undelivered events",
                            subscriber=d.name,
                            pending=d.pending(),
                            stuck=d.stuck,
                            delivered=d.delivered,
                        )
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
        if self._interrupted is None:
            self._interrupted = exc
            self._tg.cancel_scope.cancel()

    def _deliveries(self) -> list[Delivery]:
        return [*self._pump.routes.active, *self._ended]

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
        isolation: Isolation | None = None,
        on_request: Callable[[bytes], None] | None = None,
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

        ``isolation`` says where the handler runs: ``"task"`` (on the event loop;
        the default for ``async def``), ``"thread"`` (its own daemon thread; the
        default for ``def``) or ``"process"``: a child process of its own, fed
        msgpack-encoded events in batches, where it runs in a thread (``def``)
        or on an event loop of this backend (``async def``). The handler and
        the hooks are then pickled here, once; ``on_request(message)`` gets, in this
        process and in the subscriber's feeder thread, the bytes the child sends with
        :func:`request_parent`, before the batch in hand counts as done. See
        ``docs/isolation.md``.

        Nothing the handler raises leaves its subscriber: an exception, a stray
        cancellation (one this bus did not cause) and, in a ``def`` handler's
        thread, any ``BaseException`` are counted and logged as its failure, and
        it goes on with its next event. ``KeyboardInterrupt``/``SystemExit`` from
        an ``async def`` handler (on the event loop's thread) also ask to stop:
        ``on_interrupt(exc)`` is called on the loop if given, else the bus cancels
        its ``async with`` block and re-raises the exception after the drain.

        Raises ``TypeError`` for a handler that cannot take one argument, a
        non-``Event`` type, a ``"process"`` handler or hook that cannot be
        pickled, or an ``isolation`` that contradicts ``sync``; ``ValueError`` for
        an unknown ``isolation``; :class:`BusClosedError` outside the bus's block.
        """
        if self._state != "open":
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
        is_async = _is_async(handler, sync, isolation)
        pump = self._pump
        unique = self._unique_name(name or _default_name(handler))
        common: dict[str, Any] = {
            "name": unique,
            "events": types,
            "policy": policy,
            "timeout": timeout,
            "envelopes": envelopes,
            "run_key": run_key,
            "on_start": on_start,
            "on_batch_end": on_batch_end,
            "on_close": on_close,
            "on_interrupt": on_interrupt,
            "hook_name": hook_name,
        }
        d: Delivery
        try:
            if isolation == "process":
                d = ProcessDelivery(
                    pump,
                    handler,
                    child_async=is_async,
                    backend="asyncio" if on_asyncio() else "trio",
                    on_request=on_request,
                    **common,
                )
            else:
                d = (TaskDelivery if is_async else ThreadDelivery)(pump, handler, **common)
        except BaseException:
            self._names.discard(unique)  # refused: the name is free again
            raise
        pump.tick()  # what was published before subscribe is not this subscriber's
        d.handled_upto = pump.walked
        pump.routes.add(d)
        d.start(self._tg)
        return Subscription(d, pump, self._unsubscribe)

    def _unique_name(self, base: str) -> str:
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}#{n}"
        self._names.add(name)
        return name

    def _unsubscribe(self, d: Delivery) -> None:
        pump = self._pump
        if d in pump.routes.active:
            pump.tick()
            pump.routes.remove(d)
            self._ended.append(d)
            if len(self._ended) > _ENDED_KEPT:  # a service bus lives long: bound the history
                gone = [e for e in self._ended[:-_ENDED_KEPT] if e.closed]
                for old in gone:
                    self._ended.remove(old)
                    self._names.discard(old.name)
        if not d.closing:
            d.begin_close()
            pump.closing.append(d)

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
        calling subscriber are not waited for. Cancellation-safe.
        """
        pump, intake = self._pump, self._intake
        chosen = None if subscriptions is None else self._of(subscriptions)

        def quiet() -> bool:
            intake.take_foreign()
            if intake.new or intake.has_foreign():
                return False
            # handled_upto == walked implies an empty buffer: entries are all < walked
            subs = pump.routes.active if chosen is None else chosen
            return all(d.reached(pump.walked - 1) for d in subs)

        await pump.wait_until(quiet, timeout)
        return _report(pump.routes.active if chosen is None else chosen, pump.walked - 1)

    def _of(self, subscriptions: Iterable[Subscription]) -> list[Delivery]:
        wanted = {id(s) for s in subscriptions}
        return [d for d in self._deliveries() if id(d.handle) in wanted]

    # -- stats -------------------------------------------------------------------

    def stats(self) -> dict[str, SubscriberStats]:
        """``{name: SubscriberStats}`` for every subscriber, the latest 256 ended ones
        included (a long-lived bus lets older ones go, and their names).

        On the loop thread it first takes in everything published so far, so
        the counts are current at the call.
        """
        if threading.get_ident() == self._loop_thread and self._state == "open":
            self._pump.tick()
        return {d.name: stats_of(d) for d in self._deliveries()}

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


def _is_async(handler: Handler, sync: bool | None, isolation: str | None) -> bool:
    """Is the handler run as ``async def`` (on a loop)? ``sync`` and ``isolation``
    ("task" is async, "thread" is not) override the check, and must agree."""
    if isolation is not None and isolation not in _ISOLATIONS:
        raise ValueError(
            f"subscribe(isolation=...) takes 'task', 'thread', 'process' or None, got {isolation!r}"
        )
    wanted = {"task": False, "thread": True}.get(isolation or "")
    if wanted is not None and sync is not None and sync != wanted:
        raise TypeError(
            f"subscribe(isolation={isolation!r}, sync={sync}) contradict each other; "
            "give one of them"
        )
    if sync is None:
        sync = wanted
    if isolation == "task" and not is_async_callable(handler):
        raise TypeError(
            f"subscribe(isolation='task') runs the handler on the event loop, so it must "
            f"be async def; {_default_name(handler)} is not (use isolation='thread')"
        )
    return is_async_callable(handler) if sync is None else not sync


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
