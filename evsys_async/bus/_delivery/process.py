"""ProcessDelivery: a subscriber whose handler runs in a child process of its own.

A third delivery beside the task and the thread (``docs/isolation.md`` says
when to use which). Its feeder is the thread delivery's own daemon thread, so
batching, order, barriers (a batch counts as handled once the child has
handled it and flushed), lazy collection and the counts come from there; what
changes is how a batch is handled: it is sent to the child (``child.py``) as
one :class:`~.wire.Batch` message, and the feeder blocks (the GIL released)
until the child's reply, taking the child's other messages meanwhile —
failures (with the child's traceback text), requests (applied through
``on_request`` before the batch counts as done), log records and output lines
(re-emitted here). ``spawn.py`` is the parent's end of the pipe, ``wire.py``
the messages.

The child starts in the feeder thread before the first event (the loop never
waits for it; ``startup_seconds`` records spawn, import and ``on_start``).

Per event, the child bumps a shared counter after each event and reports
each failure before that, so when it dies mid-batch the parent knows which
events were handled (delivered = handled - failed); the event in hand when
the death is seen counts as failed, the rest as dropped, and every later one
as dropped too (a dead child is not restarted). The death is a WARNING and a
``CallbackFailed`` naming the exit code or signal, and ``disabled`` says it.

``timeout`` is enforced here, per event, from the counter: no progress for
longer than it and the child is killed (SIGKILL) — the event in hand counts
as failed, the rest as dropped. At close, :meth:`abandon` and :meth:`cancel`
kill a child that has not ended by the deadline.
"""

from __future__ import annotations

import logging
import pickle
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, cast

from ..._util.log import get_logger
from ..._util.worker import Outcome
from ...errors import BusClosedError, CallbackProcessError, ChildTraceback, describe
from ...events import Event
from ...policies import Entry
from . import wire
from .base import only_failures
from .spawn import ChildProcess, Dead, dumps_for_child, start_method
from .thread import ThreadDelivery

__all__ = ["ProcessDelivery"]

_log = get_logger()


class ProcessDelivery(ThreadDelivery):
    """A subscriber whose handler runs in a child process (see the module docstring).

    Made on the loop thread by ``EventBus.subscribe(..., isolation="process")``:
    the handler and its hooks are pickled here, so one that cannot be is
    refused with a ``TypeError`` before any event, and so is a wrong
    ``$EVSYS_START_METHOD`` (``ValueError``).
    """

    isolation = "process"

    def __init__(
        self,
        *args: Any,
        child_async: bool,
        backend: Literal["asyncio", "trio"],
        on_request: Callable[[bytes], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        program = self._program()
        self.on_request = on_request
        start_method()  # a wrong $EVSYS_START_METHOD fails here, at subscribe
        settings = wire.Settings(
            backend=backend,
            is_async=child_async,
            envelopes=self.envelopes,
            bus_id=self.engine.bus_id,
            root_level=logging.getLogger().getEffectiveLevel(),
            levels=_levels(),
            max_consecutive_failures=self.max_consecutive_failures,
        )
        # the child alone sees each event's outcome in order: it counts the failures in
        # a row and tells (wire.Disabled); this end counts only what it is told
        self.max_consecutive_failures = None
        self._child = ChildProcess(self.name, settings, program, self._message)
        self._flushes = self.on_batch_end is not None
        self.on_batch_end = None  # shipped in the program: the child flushes after a batch
        self._dead = False
        # the batch in hand: its events, the counter before it, its failures so far
        self._in_hand: list[Entry] | None = None
        self._batch_base = 0
        self._batch_failures = 0
        #: the child switched the handler off in the batch in hand: from here on, dropped
        self._batch_cut: int | None = None
        self._t0 = 0.0

    def _program(self) -> bytes:
        """The handler and hooks, pickled for the child; ``TypeError`` naming the fix when
        they do not pickle, or refer to ``__main__`` of a notebook or ``python -c``."""
        try:
            program, unreachable = dumps_for_child(
                (self.handler, self.on_start, self.on_batch_end, self.on_close)
            )
        except Exception as exc:
            raise TypeError(
                f"subscriber {self.name!r} runs in its own process (isolation='process'), "
                f"so its handler and hooks must pickle, and they do not: {describe(exc)}. "
                "Define the handler (or the callback's class) at module level, keep no "
                "live objects (locks, open files, clients) on it before setup(), or build "
                "the callback from its registered kind and params"
            ) from None
        if unreachable:
            raise TypeError(
                f"subscriber {self.name!r} runs in its own process (isolation='process'), "
                f"which must import {', '.join(unreachable)} to run it; "
                f"{'it is' if len(unreachable) == 1 else 'they are'} defined in __main__ of "
                "an interactive session (a notebook or `python -c`), which another process "
                "cannot import. Define it in a module (a .py file beside the notebook or "
                "script) and import it from there, or leave out isolation='process'"
            )
        return program

    # -- state the pump reads ----------------------------------------------------

    @property
    def stuck(self) -> bool:
        """The child died or was killed: it handles nothing more."""
        return self._dead

    def abandon(self) -> None:
        """At close past the deadline: kill a child that has not ended. What it handled
        of the batch in hand counts as delivered (its counter says how much), the
        rest as dropped."""
        with self._lock:
            if self._finished or self._abandoned:
                return
            self._abandoned = True  # from here on the feeder counts nothing
            alive = not self._dead
            self._dead = True
            if alive:
                self.disabled = "killed: still running at the close deadline"
        if alive:
            _log.warning(
                "callback process killed: still running at the close deadline",
                callback=self.name,
            )
            self._child.kill(wait=True)  # then its counter moves no more
        with self._lock:
            if self._in_hand is not None:
                handled = self._child.counter.value - self._batch_base
                self.delivered += max(0, handled - self._batch_failures)
            rest = self.buffer.take()
            self.taken += len(rest)
            self.dropped_stuck += max(0, self.taken - self.decided())

    def cancel(self) -> None:
        """The bus is closing past its drain: a child still running is killed."""
        if not self._finished:
            self.abandon()

    # -- the feeder thread -------------------------------------------------------

    def _begin(self) -> None:
        self._t0 = time.perf_counter()
        try:
            reply = self._child.start()
        except Dead as dead:
            self._died(None, dead, "on_start")
            return
        if isinstance(reply, wire.Broken):
            error = CallbackProcessError(
                f"could not load the subscriber's program: {reply.summary}"
            )
            error.__cause__ = ChildTraceback(reply.traceback)
            self._child.stop(alive=True)
            self._died(None, Dead(error, f"process failed to start: {reply.summary}"), "on_start")

    def _started(self) -> None:
        self.startup_seconds = time.perf_counter() - self._t0

    def _run_call(self, fn: Callable[[], Any], outcome: Outcome) -> None:
        if self._dead:
            outcome.settle(_raise, BusClosedError(f"subscriber {self.name!r}: {self.disabled}"))
            return
        try:
            payload = pickle.dumps(fn, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            error = TypeError(
                f"Subscription.call() on {self.name!r} runs the function in the "
                f"subscriber's own process, so it must pickle: {describe(exc)}"
            )
            outcome.settle(_raise, error)
            return
        try:
            self._child.send(wire.Call(payload))
            reply = self._child.await_reply(timeout=self.timeout, progress=False)
        except Dead as dead:
            self._died(None, dead, "call")
            outcome.settle(_raise, CallbackProcessError(f"subscriber {self.name!r}: {dead.reason}"))
            return
        if isinstance(reply, wire.Returned):
            outcome.settle(pickle.loads, reply.value)
        elif isinstance(reply, wire.Raised):
            outcome.settle(_raise, wire.rebuild(reply.failure))
        else:
            outcome.settle(_raise, _out_of_turn(reply, "a call"))

    def _handle(self, batch: list[Entry]) -> None:
        started = time.perf_counter()
        if self._dead:
            self._drop(batch)
            return
        child = self._child
        message = wire.Batch(self._flushes, only_failures(batch), batch)
        self._batch_base = base = child.counter.value
        self._batch_failures = 0
        self._batch_cut = None
        self._in_hand = batch
        try:
            child.send(message)
            child.await_reply(timeout=self.timeout, progress=True)
        except Dead as dead:
            self._died_in(batch, base, dead)
        else:
            with self._lock:
                if not self._abandoned:
                    cut = len(batch) if self._batch_cut is None else self._batch_cut
                    self.delivered += cut - self._batch_failures
                    self.dropped_stuck += len(batch) - cut
                    self._in_hand = None
        self.seconds += time.perf_counter() - started

    def _died_in(self, batch: list[Entry], base: int, dead: Dead) -> None:
        """The child died with ``batch`` in hand: what its counter passed was handled,
        the event in hand failed, the rest is dropped (also what it had cut)."""
        handled = self._child.counter.value - base
        cut = len(batch) if self._batch_cut is None else self._batch_cut
        with self._lock:
            if self._abandoned:
                return
            self.delivered += handled - self._batch_failures
            rest = cut - handled
            self.dropped_stuck += max(0, rest - 1) + len(batch) - cut
            self._in_hand = None
        event = batch[handled][1] if rest > 0 else None
        self._died(event, dead, "" if rest > 0 else "on_batch_end")

    def _drop(self, batch: list[Entry]) -> None:
        with self._lock:
            if not self._abandoned:
                self.dropped_stuck += len(batch)

    def drop_rest(self, batch: list[Entry], start: int) -> None:
        self._drop(batch[start:])  # disabled: never sent to the child

    def _call_hook(self, hook: Any, slot: str, *, quiet: bool = False) -> None:
        """``on_start``/``on_close``: run in the child (the hook itself was shipped)."""
        if self._dead:
            return
        try:
            self._child.send(wire.RunHook(cast(wire.HookSlot, slot)))
            self._child.await_reply(timeout=self.timeout, progress=False)
        except Dead as dead:
            self._died(None, dead, slot)

    def _end(self) -> None:
        self._child.stop(alive=not self._dead)

    # -- what the child reports (feeder thread) ---------------------------------

    def _died(self, event: Event | None, dead: Dead, slot: str) -> None:
        """Count the death (the event in hand failed, or the hook), report it once."""
        with self._lock:
            if self._abandoned:
                return
            self._dead = True
            self.disabled = dead.reason
            self.tally(event, dead.error, slot)
        self.book.record(event, dead.error, slot, False)
        self.engine.wake_from_thread()  # barriers stop waiting for it

    def _message(self, message: wire.ToParent) -> None:
        """A message that is not a reply: a failure, a request, a log record, output."""
        if isinstance(message, wire.Failed):
            self._failed(message)
        elif isinstance(message, wire.Disabled):
            self._disabled(message)
        elif isinstance(message, wire.Request):
            self._request(message.data)
        elif isinstance(message, wire.Log):
            _relog(message)
        elif isinstance(message, wire.Output):
            out = sys.stdout if message.stream == 1 else sys.stderr
            try:
                out.write(message.text)
                out.flush()
            except Exception:  # a closed stream must not end the delivery
                pass
        else:  # a reply when none was awaited: the two ends disagree
            _log.warning(
                "callback process: a reply out of turn",
                callback=self.name,
                error=str(_out_of_turn(message, "nothing")),
            )

    def _failed(self, message: wire.Failed) -> None:
        """A failure in the child: counted here; the first of its kind comes with its
        exception (rebuilt here), a later one with its type's name only."""
        batch = self._in_hand
        index = message.index
        event = batch[index][1] if batch is not None and index >= 0 else None
        exc = None if message.failure is None else wire.rebuild(message.failure)
        with self._lock:
            if self._abandoned:
                return
            self.tally(event, exc, message.slot)
            if event is not None:
                self._batch_failures += 1
        self.book.record(event, exc, message.slot, message.quiet, message.kind)

    def _disabled(self, message: wire.Disabled) -> None:
        """The child switched the handler off at ``max_consecutive_failures``."""
        self._batch_cut = message.cut
        self.disable(message.reason)

    def _request(self, data: bytes) -> None:
        if self.on_request is None:
            return
        try:
            self.on_request(data)
        except Exception as exc:
            _log.warning(
                "a request from a callback's process failed",
                callback=self.name,
                error=describe(exc),
                exc_info=exc,
            )


def _out_of_turn(message: wire.ToParent, awaited: str) -> CallbackProcessError:
    return CallbackProcessError(
        f"the subscriber's process sent {type(message).__name__} while the parent awaited "
        f"{awaited}; both ends must run the same evsys_async"
    )


def _levels() -> dict[str, int]:
    """The levels set on this process's loggers: the child's records are filtered as
    they would be here (fewer cross)."""
    levels = {"evsys_async": logging.getLogger("evsys_async").getEffectiveLevel()}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _relog(record: wire.Log) -> None:
    """Re-emit a child's log record through this process's logger of the same name."""
    logger = logging.getLogger(record.name)
    if not logger.isEnabledFor(record.level):
        return
    made = logging.makeLogRecord(
        {
            "name": record.name,
            "levelno": record.level,
            "levelname": logging.getLevelName(record.level),
            "msg": record.message,
        }
    )
    made.exc_text = record.exc_text or None
    logger.handle(made)


def _raise(exc: BaseException) -> Any:
    raise exc
