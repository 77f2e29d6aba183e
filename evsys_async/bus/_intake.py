"""The way events come in: sequence numbers, the cross-thread intake, the doorbell.

``EventBus.publish`` is two lines over this module. On the event loop's
thread :meth:`Intake.put` numbers the event, appends it to :attr:`new` and,
when a batch falls due, rings the pump's doorbell. From any other thread
:meth:`Intake.put_foreign` appends to a locked deque and, unless the pump's
timer will take it in within a batch delay, wakes the loop through
:class:`~evsys_async._util.aio.LoopWaker` (never waiting for it); the event is
numbered when the loop takes it in (:meth:`take_foreign`). Both are
O(1) whatever the number of subscribers. After :meth:`close` an event is
counted in :attr:`dropped_after_close` and logged once.

How the pump uses the doorbell is in ``docs/design.md`` ("How an event
travels").
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

import anyio

from .._util.log import get_logger
from ..events import Event

__all__ = ["Intake"]

_log = get_logger()


class Intake:
    """Numbering and the way in, for one bus. See the module docstring.

    The pump reads and writes :attr:`new`, :attr:`due`, :attr:`timer_armed`,
    :attr:`deadline` and :attr:`urgent`; everything else is this class's own.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        #: published on the loop thread, numbered, not yet walked by the pump
        self.new: list[Event] = []
        #: the number the next event gets
        self.next_seq = 0
        #: publish takes events in (False before the bus opens, and from its close on)
        self.accepting = False
        #: the pump has been rung and has not run yet
        self.due = False
        #: the pump's timer fires within one batch delay (publish may rely on it)
        self.timer_armed = False
        #: when the sleeping pump ticks next on its own
        self.deadline = math.inf
        #: waiters that want every event handed over at once (barriers, drain, close)
        self.urgent = 0
        self.dropped_after_close = 0
        self._doorbell: anyio.Event | None = None
        self._foreign: deque[Event] = deque()
        self._lock = threading.Lock()
        self._drop_lock = threading.Lock()
        self._wake_loop: Callable[[], None] | None = None

    def open(self, doorbell: anyio.Event, wake_loop: Callable[[], None]) -> None:
        """On the loop, when the bus opens: ``wake_loop`` is called (from any thread)
        after a foreign event arrives."""
        self._doorbell = doorbell
        self._wake_loop = wake_loop
        self.accepting = True

    def ring(self) -> None:
        """Make the pump run at its next chance."""
        if not self.due:
            self.due = True
            self._doorbell.set()  # type: ignore[union-attr]

    def reset_doorbell(self, doorbell: anyio.Event) -> None:
        """The pump's: a fresh doorbell once it has answered the last ring."""
        self._doorbell = doorbell
        self.due = False

    def put(self, event: Event) -> int | None:
        """Publish on the loop thread: the event's seq, or ``None`` after close."""
        if not isinstance(event, Event):
            raise TypeError(f"publish() takes an Event, got {type(event).__name__}")
        if not self.accepting:
            self.drop_closed(event)
            return None
        if self._foreign:
            # what other threads published first is numbered first: a thread that
            # publishes, then waits for the loop, sees its event before the loop's
            self.take_foreign()
        seq = self.next_seq
        self.next_seq = seq + 1
        new = self.new
        new.append(event)
        if not self.due and (
            not self.timer_armed
            or self.urgent
            or len(new) >= self.batch_size
            # A batch falls due: hand it over now, while the loop is awake anyway.
            # The timer is only the fallback for when publishing stops: a timer
            # firing inside a sleeping step costs the step more than this does.
            or time.monotonic() >= self.deadline
        ):
            self.due = True
            self._doorbell.set()  # type: ignore[union-attr]
        return seq

    def put_foreign(self, event: Event) -> None:
        """Publish from another thread: never waits for the loop.

        It wakes the loop only when the pump's timer is not armed, when someone
        waits for events (``urgent``: a barrier, a drain) or for a full batch.
        While events flow the pump ticks every batch delay anyway and takes in
        what other threads published, so a trainer's thread publishing a step
        every few milliseconds does not pull the loop's thread onto the GIL once
        a step (``benchmarks/bench_bridges.py``); such an event waits at most
        about two batch delays. The pump, after disarming its timer, looks at the
        foreign queue once more, so an event appended just before is never left
        behind (:class:`~evsys_async.bus._pump.Pump`).
        """
        if not isinstance(event, Event):
            raise TypeError(f"publish() takes an Event, got {type(event).__name__}")
        with self._lock:
            if not self.accepting:
                self.drop_closed(event)
                return
            self._foreign.append(event)
            pending = len(self._foreign)
        if self.timer_armed and not self.urgent and pending < self.batch_size:
            return
        assert self._wake_loop is not None
        self._wake_loop()

    def take_foreign(self) -> None:
        """On the loop: number what other threads published, after what is in :attr:`new`."""
        foreign = self._foreign
        while foreign:
            event = foreign.popleft()
            if self.accepting:
                self.next_seq += 1
                self.new.append(event)
            else:
                self.drop_closed(event)

    def has_foreign(self) -> bool:
        return bool(self._foreign)

    def stop_accepting(self) -> None:
        """From here on a publish from any thread is counted as dropped."""
        with self._lock:
            self.take_foreign()
            self.accepting = False

    def close(self) -> None:
        """Stop accepting; what other threads published and nobody took in is dropped."""
        with self._lock:
            self.accepting = False
        self.take_foreign()  # counted as dropped: nobody is left to deliver them

    def drop_closed(self, event: Event) -> None:
        with self._drop_lock:  # publishers in several threads: count each, log once
            self.dropped_after_close += 1
            first = self.dropped_after_close == 1
        if first:
            _log.warning(
                "event published after the bus closed; dropped",
                event_type=type(event).__name__,
            )
