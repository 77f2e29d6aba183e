"""The bus's book of its subscribers: their unique names, and the ended ones kept for
``stats()`` (the active ones are the pump's routes).

A name given twice gets ``#2``, ``#3``; a subscriber refused at subscribe gives
its name back. Unsubscribing takes a delivery off the routes (after the pump
has walked what was published before) and begins its close; a long-lived bus
(a service) keeps the latest :data:`ENDED_KEPT` ended ones and lets older
closed ones go, with their names.
"""

from __future__ import annotations

from collections.abc import Iterable

from .._util.log import get_logger
from ._delivery.base import Delivery
from ._pump import Pump

__all__ = ["ENDED_KEPT", "Subscribers"]

_log = get_logger()

#: ended subscriptions whose stats stay in ``stats()``; older closed ones are let go
ENDED_KEPT = 256


class Subscribers:
    """Names and history of one bus's subscribers (loop thread only)."""

    def __init__(self, pump: Pump) -> None:
        self.pump = pump
        #: unsubscribed, kept for stats (the latest ``ENDED_KEPT`` closed ones)
        self.ended: list[Delivery] = []
        self._names: set[str] = set()

    def unique_name(self, base: str) -> str:
        """``base``, or ``base#2``, ``base#3``... if taken; taken from now on."""
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}#{n}"
        self._names.add(name)
        return name

    def release(self, name: str) -> None:
        """A subscriber refused at subscribe: its name is free again."""
        self._names.discard(name)

    def unsubscribe(self, d: Delivery) -> None:
        """Take ``d`` off the routes (what was published before is still its) and begin
        its close; again for an ended one is a no-op."""
        pump = self.pump
        if d in pump.routes.active:
            pump.tick()
            pump.remove(d)
            self.ended.append(d)
            if len(self.ended) > ENDED_KEPT:  # a service bus lives long: bound the history
                gone = [e for e in self.ended[:-ENDED_KEPT] if e.closed]
                for old in gone:
                    self.ended.remove(old)
                    self._names.discard(old.name)
        if not d.closing:
            d.begin_close()
            pump.closing.append(d)

    def end_all(self) -> None:
        """At close: unsubscribe every active subscriber."""
        for d in list(self.pump.routes.active):
            self.unsubscribe(d)

    def all_ended(self) -> bool:
        """Every ended subscriber has closed (or is stuck: not waited for)."""
        return all(d.closed or d.stuck for d in self.ended)

    def abandon_the_rest(self) -> None:
        """At close, past waiting: give up on what has not ended (what it cannot
        handle is dropped) and log each subscriber that left events undelivered."""
        for d in self.ended:
            d.abandon()
            if d.pending() or d.stuck or not d.closed:
                _log.warning(
                    "bus closed with undelivered events",
                    subscriber=d.name,
                    pending=d.pending(),
                    stuck=d.stuck,
                    delivered=d.delivered,
                )

    def all(self) -> list[Delivery]:
        """The active ones, then the ended ones kept."""
        return [*self.pump.routes.active, *self.ended]

    def of(self, handles: Iterable[object]) -> list[Delivery]:
        """The deliveries behind these subscriptions (their public handles)."""
        wanted = {id(h) for h in handles}
        return [d for d in self.all() if id(d.handle) in wanted]
