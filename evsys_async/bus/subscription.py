"""Subscription: what ``EventBus.subscribe`` returns — a handle on one subscriber.

The mechanics live behind it, in its delivery (``_delivery/``: a task, a
thread or a process) and the bus's pump (``_pump.py``). This module also holds the records
a caller reads: :class:`SubscriberStats` and :class:`DrainReport`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from .._util.aio import Deadline
from ..events import Event
from ..policies import Policy
from ._delivery.base import Delivery, current_delivery, thread_local

if TYPE_CHECKING:
    from ._pump import Pump

__all__ = [
    "DrainReport",
    "SubscriberStats",
    "Subscription",
    "current_subscription",
    "stats_of",
]

T = TypeVar("T")


class SubscriberStats(msgspec.Struct, frozen=True):
    """Counts for one subscriber, current at the call of ``EventBus.stats()``.

    Every matching event is counted once: ``delivered`` (its handler
    returned) + ``failed`` (it raised or timed out) + ``dropped`` (by the
    policy, or never reachable: a ``def`` handler stuck past its timeout, a
    dead process, a disabled subscriber) + ``pending`` (in the buffer, or
    taken and not yet handled).
    ``coalesced`` is the part of ``dropped`` that ``Latest`` replaced by design;
    ``hook_failures`` counts failed ``on_start``/``on_batch_end``/``on_close``
    calls, which are not events, and ``failed_hooks`` the same by hook, under
    the name ``hook_name`` gives the slot (a callback's ``setup``, ``flush``,
    ``teardown``; else ``on_start``, ``on_batch_end``, ``on_close``).
    ``disabled`` says why it handles no more events, once it does not: its
    ``on_start`` failed (``requires_start``), too many failures in a row
    (``max_consecutive_failures``), or its own process died or was killed;
    every later event then counts as dropped. A subscriber in its own
    process also reports ``startup_seconds``.
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
    #: seconds from subscribe until it could take its first event: a process
    #: subscriber's start (spawn, imports, ``on_start``); 0 for a task or thread
    startup_seconds: float = 0.0
    #: why it handles no more events (``"process died: SIGKILL"``,
    #: ``"setup failed: ConnectionError: refused"``), else None
    disabled: str | None = None
    #: failed lifecycle calls by hook name (``{"setup": 1, "flush": 12}``)
    failed_hooks: dict[str, int] = msgspec.field(default_factory=dict)


class DrainReport(msgspec.Struct, frozen=True):
    """What ``drain``/``publish_and_wait`` saw when they returned.

    ``ok`` is true when nothing was left; ``pending`` maps each subscriber that
    was not done to how many events it has not finished (its batch in hand
    included); ``stuck`` names subscribers whose ``def`` handler is past its
    timeout (abandoned, not waited for).
    """

    ok: bool
    pending: dict[str, int]
    stuck: tuple[str, ...] = ()


def stats_of(d: Delivery) -> SubscriberStats:
    """A delivery's counts as the public record."""
    buffer = d.buffer
    return SubscriberStats(
        delivered=d.delivered,
        pending=d.pending(),
        dropped=buffer.dropped + d.dropped_stuck,
        failed=d.failed,
        max_pending=d.max_pending,
        handler_seconds=d.seconds,
        coalesced=buffer.dropped - buffer.forced,
        hook_failures=d.hook_failures,
        startup_seconds=d.startup_seconds,
        disabled=d.disabled,
        failed_hooks=d.failed_hooks.copy(),
    )


class Subscription:
    """One subscriber. Returned by :meth:`EventBus.subscribe`.

    Use :meth:`wait` as a barrier, :meth:`call` to run code where the handler
    runs, and :meth:`aclose` to drain and end it.
    """

    def __init__(
        self, delivery: Delivery, pump: Pump, unsubscribe: Callable[[Delivery], None]
    ) -> None:
        self._delivery = delivery
        self._pump = pump
        self._unsubscribe = unsubscribe
        delivery.handle = self

    def __repr__(self) -> str:
        return f"<Subscription {self.name!r} policy={self.policy!r}>"

    # -- what it was subscribed with ---------------------------------------------

    @property
    def name(self) -> str:
        """Unique on its bus (a repeated name gets ``#2``, ``#3``)."""
        return self._delivery.name

    @property
    def handler(self) -> Callable[[Any], Any]:
        return self._delivery.handler

    @property
    def events(self) -> tuple[type[Event], ...]:
        return self._delivery.events

    @property
    def policy(self) -> Policy:
        return self._delivery.policy

    @property
    def timeout(self) -> float | None:
        return self._delivery.timeout

    @property
    def envelopes(self) -> bool:
        return self._delivery.envelopes

    @property
    def run_key(self) -> str | None:
        return self._delivery.run_key

    @property
    def is_async(self) -> bool:
        """The handler runs in a task on the event loop (else in its own thread)."""
        return self._delivery.is_async

    @property
    def isolation(self) -> str:
        """Where the handler runs: ``"task"``, ``"thread"`` or ``"process"``."""
        return self._delivery.isolation

    # -- state -------------------------------------------------------------------

    @property
    def stuck(self) -> bool:
        """True while a ``def`` handler is past its timeout (abandoned, not waited for),
        and for good once a subscriber's own process died or was killed."""
        return self._delivery.stuck

    @property
    def last_error(self) -> BaseException | None:
        """The exception of the most recent failure, if any."""
        return self._delivery.last_error

    def stats(self) -> SubscriberStats:
        """This subscriber's counts (see :meth:`EventBus.stats`)."""
        return stats_of(self._delivery)

    # -- waiting -----------------------------------------------------------------

    async def wait(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until this subscriber has handled every matching event up to ``seq``.

        Returns ``False`` if ``timeout`` passed first. A stuck ``def`` handler,
        an ended subscription and the calling subscriber itself count as done.
        Cancellation-safe: nothing changes for the subscriber.
        """
        d = self._delivery
        return await self._pump.wait_until(lambda: d.reached(seq), timeout)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` where this subscriber's handler runs: in its thread, between two
        batches, for a ``def`` handler (a callback tied to its thread — sqlite3, a
        GUI — stays safe); on the loop for an ``async def`` one. Waits for a
        hung ``def`` handler to return; cancel the call to stop waiting. For a
        subscriber in its own process ``fn`` is pickled and runs there, between
        two batches, and its result is pickled back.
        Raises what ``fn`` raised, or :class:`BusClosedError` if the thread ended.
        """
        return await self._delivery.call(fn)

    async def aclose(self, timeout: float | None = 30.0) -> bool:
        """Drain this subscriber, then end it: no new events, ``on_close`` runs in its
        thread or task. Returns ``False`` if the deadline passed first (a stuck
        ``def`` handler's ``on_close`` then runs when the hung call returns, and
        what it can no longer handle is counted as dropped)."""
        d, pump = self._delivery, self._pump
        deadline = Deadline(timeout)
        ok = await self.wait(pump.intake.next_seq - 1, deadline.remaining())
        self._unsubscribe(d)
        # a def handler stuck past its timeout is not waited for (its on_close runs
        # in its thread when the hung call returns)
        ended = await pump.wait_until(lambda: d.closed or d.stuck, deadline.remaining())
        d.abandon()
        return ok and ended and d.closed  # False while stuck


def current_subscription() -> Subscription | None:
    """The subscription whose handler is running in this task or thread, if any."""
    d = current_delivery.get() or getattr(thread_local, "delivery", None)
    handle = None if d is None else d.handle
    return handle if isinstance(handle, Subscription) else None
