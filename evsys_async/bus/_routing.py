"""Routes: which deliveries an event goes to, and the walk that puts it there.

The table maps an event's class and run key to what takes it: the bound
``put_many`` of each matching delivery's buffer (by type, subclasses
included; its run-key filter decided here, once per class and key, not per
event). It is fixed between two ``subscribe``/unsubscribe calls and filled
lazily, so the walk costs two dict lookups per event, and one call per
matching subscriber per run of events that share a route (a list's
``extend``: the entries are shared, never copied). Events about a subscriber (``CallbackFailed``,
``SubscriberLagged``), which that subscriber never gets, take a slower path
that asks each delivery (``Delivery.accepts``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..events import Event
from ._delivery.base import ABOUT_A_SUBSCRIBER, Delivery

__all__ = ["Routes"]

#: where one class and run key of event goes: each buffer's ``put_many``, and the
#: deliveries whose policy bounds them (they count arrivals for their lag report)
_Route = tuple[tuple[Callable[[list[Any]], None], ...], tuple[Delivery, ...]]


class Routes:
    """The active deliveries and the (type, run key) -> route table over them."""

    def __init__(self) -> None:
        self.active: list[Delivery] = []
        self._table: dict[type, tuple[Delivery, ...]] = {}
        self._routes: dict[type, dict[str, _Route]] = {}

    def add(self, delivery: Delivery) -> None:
        self.active.append(delivery)
        self._clear()

    def remove(self, delivery: Delivery) -> None:
        self.active.remove(delivery)
        self._clear()

    def _clear(self) -> None:
        self._table.clear()
        self._routes.clear()

    def of(self, cls: type) -> tuple[Delivery, ...]:
        """The deliveries an event of class ``cls`` goes to (before per-event filters)."""
        subs = self._table.get(cls)
        if subs is None:
            subs = self._table[cls] = tuple(d for d in self.active if issubclass(cls, d.events))
        return subs

    def _route(self, cls: type, run_key: str) -> _Route:
        """What an event of ``cls`` stamped ``run_key`` goes to (filled on first sight)."""
        # a run_key subscriber sees its run's events and the run-less ones (health events)
        takers = [d for d in self.of(cls) if d.run_key is None or run_key in (d.run_key, "")]
        route: _Route = (
            tuple(d.buffer.put_many for d in takers),
            tuple(d for d in takers if d.policy.bounded),
        )
        self._routes.setdefault(cls, {})[run_key] = route
        return route

    def walk(self, events: list[Event], seq: int) -> int:
        """Put ``(seq, event)`` entries into each matching buffer, numbering from
        ``seq``; returns the number after the last. One shared entry per event.

        Consecutive events with one route (a run of ``StepEnded``) go to each of its
        buffers as one ``put_many``: one call per buffer and run, not per event."""
        routes = self._routes
        route: _Route | None = None
        run: list[tuple[int, Event]] = []
        append = run.append
        last: tuple[type, str] | None = None  # the class and run key of the run's events
        for event in events:
            cls, key = event.__class__, event.run_key
            if last is None or cls is not last[0] or key != last[1]:
                by_key = routes.get(cls)
                found = None if by_key is None else by_key.get(key)
                if found is None:
                    if cls in ABOUT_A_SUBSCRIBER:
                        if run:
                            _deliver(route, run)  # type: ignore[arg-type]
                            run, last = [], None
                            append = run.append
                        self._about(event, seq)
                        seq += 1
                        continue
                    found = self._route(cls, key)
                if found is not route and run:
                    _deliver(route, run)  # type: ignore[arg-type]
                    run = []
                    append = run.append
                route, last = found, (cls, key)
            append((seq, event))
            seq += 1
        if run:
            _deliver(route, run)  # type: ignore[arg-type]
        return seq

    def _about(self, event: Event, seq: int) -> None:
        """An event about a subscriber: never to that subscriber (``accepts``)."""
        entry = (seq, event)
        for d in self.of(event.__class__):
            if d.accepts(event):
                d.put(entry)
                d.arrivals += 1


def _deliver(route: _Route, run: list[tuple[int, Event]]) -> None:
    """A run of entries into every buffer of one route, in order."""
    puts, bounded = route
    for put_many in puts:
        put_many(run)
    if bounded:
        n = len(run)
        for d in bounded:
            d.arrivals += n
