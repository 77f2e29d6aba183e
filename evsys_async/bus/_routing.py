"""Routes: which deliveries an event goes to, and the walk that puts it there.

The table maps an event's class to the deliveries subscribed to it (by type,
subclasses included). It is fixed between two ``subscribe``/unsubscribe calls
and filled lazily, one class at a time, so the walk costs a dict lookup per
event and one ``put`` per matching subscriber.
"""

from __future__ import annotations

from ..events import Event
from ._delivery.base import ABOUT_A_SUBSCRIBER, Delivery

__all__ = ["Routes"]


class Routes:
    """The active deliveries and the type -> deliveries table over them."""

    def __init__(self) -> None:
        self.active: list[Delivery] = []
        self._table: dict[type, tuple[Delivery, ...]] = {}

    def add(self, delivery: Delivery) -> None:
        self.active.append(delivery)
        self._table.clear()

    def remove(self, delivery: Delivery) -> None:
        self.active.remove(delivery)
        self._table.clear()

    def of(self, cls: type) -> tuple[Delivery, ...]:
        """The deliveries an event of class ``cls`` goes to (before per-event filters)."""
        subs = self._table.get(cls)
        if subs is None:
            subs = self._table[cls] = tuple(d for d in self.active if issubclass(cls, d.events))
        return subs

    def walk(self, events: list[Event], seq: int) -> int:
        """Put ``(seq, event)`` entries into each matching buffer, numbering from
        ``seq``; returns the number after the last. One shared entry per event."""
        table = self._table
        for event in events:
            cls = event.__class__
            subs = table.get(cls)
            if subs is None:
                subs = self.of(cls)
            if subs:
                entry = (seq, event)
                # decided once per event, not per subscriber: does a filter apply?
                about_a_subscriber = cls in ABOUT_A_SUBSCRIBER
                for d in subs:
                    if (about_a_subscriber or d.run_key is not None) and not d.accepts(event):
                        continue
                    d.put(entry)
                    d.arrivals += 1
            seq += 1
        return seq
