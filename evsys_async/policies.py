"""Delivery policies: what a lagging subscriber's buffer keeps.

* :class:`Lossless` — every event, in order; the buffer grows; never drops.
  Lag is reported through ``SubscriberLagged``.
* :class:`Latest` — a pending level-like event (``Event.coalesce``:
  ``StepEnded``, ``SubscriberLagged``, user classes that opt in) is replaced
  by a newer one of the same type and run; other events are kept in publish
  order, at most ``max_kept`` of them (past that the oldest are dropped).
* :class:`DropOldest` — at most ``maxlen`` pending events of any type; the
  oldest go first.

Drops are counted in ``SubscriberStats.dropped`` and reported through
``SubscriberLagged``: when a bound first forces a drop, and at each doubling
(``docs/design.md``, "Guarantees"). Memory under a stuck bounded subscriber is
bounded.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from .events import Event

__all__ = ["Buffer", "DropOldest", "Entry", "Latest", "Lossless", "Policy"]

#: One pending entry: the event's sequence number and the event.
Entry: TypeAlias = tuple[int, Event]


class Buffer(Protocol):
    """A subscriber's pending entries, as its policy keeps them (one per subscriber).

    ``put`` runs on the event loop for every matching event, so it is cheap
    (``put_many`` puts several, in order, as one call); ``take`` hands over
    everything pending, in publish order, and empties it.
    ``dropped`` counts what the policy let go, ``forced`` the part of it a bound
    forced (the rest ``Latest`` coalesced by design).
    """

    def put(self, entry: Entry, /) -> None: ...
    def put_many(self, entries: list[Entry], /) -> None: ...
    @property
    def dropped(self) -> int: ...
    @property
    def forced(self) -> int: ...
    def __len__(self) -> int: ...
    def take(self) -> list[Entry]: ...


@dataclass(frozen=True, slots=True)
class Lossless:
    """Every event, in publish order, never dropped (the default)."""

    bounded = False

    def buffer(self) -> Buffer:
        return _ListBuffer()


@dataclass(frozen=True, slots=True)
class Latest:
    """Keep only the newest pending level-like event per type and run.

    Other events are kept in order, up to ``max_kept``.
    """

    max_kept: int = 1000
    bounded = True

    def __post_init__(self) -> None:
        if self.max_kept < 1:
            raise ValueError(f"Latest(max_kept=...) must be >= 1, got {self.max_kept}")

    def buffer(self) -> Buffer:
        return _LatestBuffer(self.max_kept)


@dataclass(frozen=True, slots=True)
class DropOldest:
    """A window of at most ``maxlen`` pending events; older ones are dropped."""

    maxlen: int
    bounded = True

    def __post_init__(self) -> None:
        if self.maxlen < 1:
            raise ValueError(f"DropOldest(maxlen=...) must be >= 1, got {self.maxlen}")

    def buffer(self) -> Buffer:
        return _WindowBuffer(self.maxlen)


Policy: TypeAlias = Lossless | Latest | DropOldest


class _ListBuffer:
    """Pending entries of a ``Lossless`` subscriber: the shared entries in a list."""

    __slots__ = ("_items", "dropped", "forced", "put", "put_many")

    def __init__(self) -> None:
        self._items: list[Entry] = []
        self.put = self._items.append  # the C method itself: no Python frame per event
        self.put_many = self._items.extend
        self.dropped = self.forced = 0  # never drops

    def __len__(self) -> int:
        return len(self._items)

    def take(self) -> list[Entry]:
        out = self._items[:]
        self._items.clear()
        return out


class _WindowBuffer:
    """Pending entries of a ``DropOldest`` subscriber."""

    __slots__ = ("_items", "dropped")

    def __init__(self, maxlen: int) -> None:
        self._items: deque[Entry] = deque(maxlen=maxlen)
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def forced(self) -> int:
        """Drops forced by the bound (here: every drop)."""
        return self.dropped

    def put(self, entry: Entry) -> None:
        items = self._items
        if len(items) == items.maxlen:
            self.dropped += 1
        items.append(entry)

    def put_many(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.put(entry)

    def take(self) -> list[Entry]:
        out = list(self._items)
        self._items.clear()
        return out


class _LatestBuffer:
    """Pending entries of a ``Latest`` subscriber, in publish order.

    Coalescing events are keyed by (type, run_key) and move to the end when
    replaced; the others are keyed by their unique seq.
    """

    __slots__ = ("_items", "_kept", "_max_kept", "dropped", "forced")

    def __init__(self, max_kept: int) -> None:
        self._items: OrderedDict[Any, Entry] = OrderedDict()
        self._kept = 0  # how many non-coalescing entries are pending
        self._max_kept = max_kept
        self.dropped = 0
        self.forced = 0  # dropped because max_kept was reached (not coalesced)

    def __len__(self) -> int:
        return len(self._items)

    def put(self, entry: Entry) -> None:
        items = self._items
        event = entry[1]
        if event.coalesce:
            key: Any = (type(event), event.run_key)
            if items.pop(key, None) is not None:
                self.dropped += 1
            items[key] = entry
            return
        items[entry[0]] = entry
        self._kept += 1
        if self._kept > self._max_kept:
            # drop the oldest kept (non-coalescing) entry; coalescing keys are few
            for key in items:
                if not isinstance(key, tuple):
                    del items[key]
                    break
            self._kept -= 1
            self.dropped += 1
            self.forced += 1

    def put_many(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.put(entry)

    def take(self) -> list[Entry]:
        out = list(self._items.values())
        self._items.clear()
        self._kept = 0
        return out
