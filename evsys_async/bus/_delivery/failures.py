"""How a subscriber's failures are told: the first of each kind in full, the rest in
summaries, so that failing costs a counter increment.

A handler that raises on every event must not cost more than one that
returns: formatting a traceback, writing a WARNING and publishing a
``CallbackFailed`` per failure made a callback whose server is down slow its
training about 18x. So each subscriber keeps a :class:`FailureBook`:

* a failure's *kind* is its subscriber, its hook (the handler's
  ``hook_name``: ``on_step_end``, ``flush``, ...) and its exception's type;
* the first failure of a kind is told at once: one WARNING line with the
  traceback as ``exc_info``, and a ``CallbackFailed`` (``count`` 1);
* a later one is counted (under a lock: a thread and the loop may both
  count) and nothing else happens, unless its kind's next summary is due:
  summaries come at growing intervals (1 s after the first, then 2, 4, ...
  up to a minute), each one WARNING line without a traceback
  (``csv_metrics: 4,812 more RuntimeError in on_step_end since 12:00:01``)
  and one ``CallbackFailed`` whose ``count`` is the failures it stands for
  and whose ``error`` is the first one's text;
* :meth:`FailureBook.flush` tells what no summary told yet: the bus calls it
  when a drain is quiet and when the subscriber ends, so nothing goes
  unreported.

The sum of ``CallbackFailed.count`` over a subscriber's announcements is its
number of announced failures: every failure, less those the bus never
announces (a failure while handling ``CallbackFailed``, or in the flush of a
batch of only those: a broken sink must not start a storm). The counts in
``SubscriberStats`` are the delivery's own, kept beside this book.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from ...events import CallbackFailed

__all__ = ["FIRST_SUMMARY", "LONGEST_SUMMARY", "FailureBook", "Kind", "Subject", "in_a_row"]

#: seconds from a kind's first failure to its first summary; each gap then doubles
FIRST_SUMMARY = 1.0
#: ... up to this
LONGEST_SUMMARY = 60.0


def in_a_row(limit: int, last: str) -> str:
    """The ``disabled`` text of a handler switched off by ``max_consecutive_failures``."""
    return f"{limit} failures in a row (the last: {last})"


class Kind:
    """One kind of failure of one subscriber: what was told, what is still to tell."""

    __slots__ = (
        "announced",
        "count",
        "error",
        "event_type",
        "gap",
        "hook",
        "kind",
        "loud",
        "loud_told",
        "next_at",
        "since",
        "told",
    )

    def __init__(self, hook: str, kind: str, event_type: str, error: str) -> None:
        self.hook = hook
        self.kind = kind
        self.event_type = event_type
        #: the first failure's one line (every summary's ``CallbackFailed.error``)
        self.error = error
        #: failures of this kind, and how many of them were told (logged)
        self.count = 0
        self.told = 0
        #: the part of ``count`` that is announced (``CallbackFailed``), and told so
        self.loud = 0
        self.loud_told = 0
        #: a ``CallbackFailed`` has been published for this kind
        self.announced = False
        #: the wall-clock time the untold failures are counted from
        self.since = time.time()
        self.gap = FIRST_SUMMARY
        self.next_at = time.monotonic() + FIRST_SUMMARY


class Subject(Protocol):
    """The subscriber a book is kept for (``base.Delivery``): how it names a failure,
    and how it tells one."""

    def label(self, event: Any, slot: str) -> str:
        """The hook a failure is in."""

    def describe(self, exc: BaseException) -> str:
        """A failure's one line."""

    def tell_first(
        self, event: Any, exc: BaseException | None, slot: str, quiet: bool, kind: Kind
    ) -> None:
        """Tell the first failure of its kind in full (``kind.error`` is its line)."""

    def tell_again(self, kind: Kind, more: int, loud: int, since: float) -> None:
        """Tell ``more`` failures of ``kind`` since ``since`` in one line."""


class FailureBook:
    """One subscriber's failures by kind (see the module docstring). Any thread."""

    def __init__(self, subject: Subject) -> None:
        self.subject = subject
        #: (event class, lifecycle slot, exception type or name) -> its kind; several
        #: keys may share one kind (two event types that one hook handles)
        self._keys: dict[tuple[Any, str, Any], Kind] = {}
        #: (hook, exception type name) -> kind
        self._kinds: dict[tuple[str, str], Kind] = {}
        self._lock = threading.Lock()

    def record(
        self,
        event: Any,
        exc: BaseException | None,
        slot: str,
        quiet: bool,
        kind: str = "",
    ) -> None:
        """Count one failure (the subscriber's stats count it too), and tell it if it is
        the first of its kind or a summary is due. ``exc`` is ``None`` for a repeated
        failure in a subscriber's own process, whose type name is then ``kind``."""
        loud = not quiet and type(event) is not CallbackFailed
        key = (type(event), slot, kind or type(exc))
        with self._lock:
            entry = self._keys.get(key)
            first = False
            if entry is None:
                entry, first = self._new(key, event, exc, slot, kind)
            entry.count += 1
            if loud:
                entry.loud += 1
            if first:
                entry.told, entry.loud_told, entry.announced = 1, entry.loud, loud
            else:
                due = time.monotonic() >= entry.next_at or (loud and not entry.announced)
        if first:  # told in full: the traceback, and CallbackFailed (count 1)
            self.subject.tell_first(event, exc, slot, not loud, entry)
        elif due:
            self.tell(entry)

    def _new(
        self, key: tuple[Any, str, Any], event: Any, exc: Any, slot: str, kind: str
    ) -> tuple[Kind, bool]:
        """The kind of a key seen for the first time (under the lock): a kind another key
        of the same hook already has, or a new one (``True``: told in full now)."""
        hook = self.subject.label(event, slot)
        name = kind or type(exc).__name__
        entry = self._kinds.get((hook, name))
        if entry is not None:
            self._keys[key] = entry
            return entry, False
        error = self.subject.describe(exc) if exc is not None else name
        event_type = type(event).__name__ if event is not None else ""
        entry = self._kinds[hook, name] = self._keys[key] = Kind(hook, name, event_type, error)
        return entry, True

    def tell(self, entry: Kind) -> None:
        """Tell what ``entry`` has not told yet (a summary), and when to tell next."""
        with self._lock:
            more, loud = entry.count - entry.told, entry.loud - entry.loud_told
            since = entry.since
            entry.told, entry.loud_told = entry.count, entry.loud
            entry.announced = entry.announced or loud > 0
            entry.since = time.time()
            entry.gap = min(entry.gap * 2, LONGEST_SUMMARY)
            entry.next_at = time.monotonic() + entry.gap
        if more:
            self.subject.tell_again(entry, more, loud, since)

    def flush(self) -> bool:
        """Tell every kind's untold failures now; True if anything was told."""
        with self._lock:
            untold = [k for k in self._kinds.values() if k.count > k.told]
        for entry in untold:
            self.tell(entry)
        return bool(untold)
