"""ProcessDelivery: a subscriber whose handler runs in a child process of its own.

A third delivery beside the task and the thread (``docs/isolation.md`` says
when to use which). Its feeder is the thread delivery's own daemon thread, so
batching, order, barriers (a batch counts as handled once the child has
handled it and flushed), lazy collection and the counts come from there; what
changes is how a batch is handled: it is encoded as msgpack, sent to the child
(``_child.py``) over a pipe, and the feeder blocks (the GIL released) until
the child's acknowledgement, reading the child's other messages meanwhile —
failures (with the child's traceback text), requests (applied through
``on_request`` before the batch counts as done), log records and output lines
(re-emitted here).

The child starts in the feeder thread before the first event (the loop never
waits for it; ``startup_seconds`` records spawn, import and ``on_start``).
Children start with ``forkserver`` where there is one (Linux), else
``spawn``: never a plain fork of a process that has threads.

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

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # its exit handler first, so that ours runs before it
import os
import pickle
import signal
import sys
import time
import weakref
from collections.abc import Callable
from typing import Any

import msgspec

from ..._util.log import get_logger
from ..._util.worker import Outcome
from ...errors import BusClosedError, CallbackProcessError, ChildTraceback, describe
from ...events import Event
from ...policies import Entry
from . import child as _child
from .base import only_failures
from .thread import ThreadDelivery

__all__ = ["ProcessDelivery", "start_method"]

_log = get_logger()

#: how long a child that was told to end may take before it is killed
_EXIT_GRACE = 5.0
#: the environment variable that picks the start method ("spawn" or "forkserver")
START_METHOD_ENV = "EVSYS_START_METHOD"

#: children still running, killed at interpreter exit if their bus never closed
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def start_method() -> str:
    """``$EVSYS_START_METHOD`` if set, else ``forkserver`` where available, else ``spawn``."""
    chosen = os.environ.get(START_METHOD_ENV, "")
    methods = multiprocessing.get_all_start_methods()
    if chosen:
        if chosen not in ("spawn", "forkserver") or chosen not in methods:
            raise ValueError(
                f"{START_METHOD_ENV}={chosen!r}: pick 'spawn' or 'forkserver' "
                f"(available here: {', '.join(m for m in methods if m != 'fork')})"
            )
        return chosen
    return "forkserver" if "forkserver" in methods else "spawn"


def _context() -> Any:
    method = start_method()
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # each child forks from a server that has the runtime imported already
        ctx.set_forkserver_preload(["__main__", "evsys_async.bus._delivery.child"])
    return ctx


@atexit.register
def _kill_leftovers() -> None:  # registered after multiprocessing's: runs before its joins
    for proc in list(_LIVE):
        with contextlib.suppress(ValueError, OSError):
            if not multiprocessing.connection.wait([proc.sentinel], 0):
                proc.kill()


class _Dead(Exception):
    """The child ended while the feeder waited (``error`` is what to report)."""

    def __init__(self, error: BaseException, reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason


class ProcessDelivery(ThreadDelivery):
    """A subscriber whose handler runs in a child process (see the module docstring).

    Made on the loop thread by ``EventBus.subscribe(..., isolation="process")``:
    the handler and its hooks are pickled here, so one that cannot be is
    refused with a ``TypeError`` before any event.
    """

    isolation = "process"

    def __init__(
        self,
        *args: Any,
        child_async: bool,
        backend: str,
        on_request: Callable[[Any], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        try:
            self._program = pickle.dumps(
                (self.handler, self.on_start, self.on_batch_end, self.on_close),
                protocol=pickle.HIGHEST_PROTOCOL,
            )
        except Exception as exc:
            raise TypeError(
                f"subscriber {self.name!r} runs in its own process (isolation='process'), "
                f"so its handler and hooks must pickle, and they do not: {describe(exc)}. "
                "Define the handler (or the callback's class) at module level, keep no "
                "live objects (locks, open files, clients) on it before setup(), or build "
                "the callback from its registered kind and params"
            ) from None
        self.on_request = on_request
        start_method()  # a wrong $EVSYS_START_METHOD fails here, at subscribe
        self._settings = {
            "backend": backend,
            "is_async": child_async,
            "envelopes": self.envelopes,
            "bus_id": self.engine.bus_id,
            "root_level": logging.getLogger().getEffectiveLevel(),
            "levels": _levels(),
        }
        self._flushes = self.on_batch_end is not None
        self.on_batch_end = None  # shipped in the program: the child flushes after a batch
        self._encoder = msgspec.msgpack.Encoder()
        self._process: Any = None
        self._conn: Any = None
        self._counter: Any = None
        self._dead = False
        # the batch in hand: the counter before it, its failures so far
        self._in_batch = False
        self._batch_base = 0
        self._batch_failures = 0
        self._t0 = 0.0

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
            self._kill(wait=True)  # then its counter moves no more
        with self._lock:
            if self._in_batch:
                handled = self._counter.value - self._batch_base
                self.delivered += max(0, handled - self._batch_failures)
            rest = self.buffer.take()
            self.taken += len(rest)
            self.dropped_stuck += max(0, self.taken - self.decided())

    def cancel(self) -> None:
        """The bus is closing past its drain: a child still running is killed."""
        if not self._finished:
            self.abandon()

    def _kill(self, *, wait: bool = False) -> None:
        """SIGKILL the child (any thread); with ``wait``, until it has ended. Only the
        feeder thread reaps it (``join``): two threads reaping one child race."""
        proc = self._process
        with contextlib.suppress(ValueError, OSError):  # closed meanwhile: it has ended
            # its sentinel, not exitcode/is_alive(): those reap it (waitpid) from this thread
            if proc is not None and not multiprocessing.connection.wait([proc.sentinel], 0):
                proc.kill()
                if wait:
                    multiprocessing.connection.wait([proc.sentinel], _EXIT_GRACE)

    # -- the feeder thread -------------------------------------------------------

    def _begin(self) -> None:
        self._t0 = time.perf_counter()
        try:
            self._launch()
        except _Dead as dead:
            self._died(None, dead, "on_start")

    def _started(self) -> None:
        self.startup_seconds = time.perf_counter() - self._t0

    def _launch(self) -> None:
        """Start the child and wait until its program is loaded."""
        ctx = _context()
        parent_end, child_end = ctx.Pipe()
        try:
            self._counter = ctx.RawValue("q", 0)
            proc = ctx.Process(
                target=_child.main,
                args=(child_end, self._counter, self._settings, self._program),
                name=f"evsys-sub:{self.name}",
            )
            proc.start()
        except Exception as exc:
            parent_end.close()
            child_end.close()
            raise _Dead(exc, f"process failed to start: {describe(exc)}") from None
        # the parent's copy of the child's end must go, or the child's death is no EOF
        child_end.close()
        self._process, self._conn = proc, parent_end
        _LIVE.add(proc)
        reply = self._await(progress=False, timed=False)  # hook_timeout is per hook call
        if reply[:1] == _child.BROKEN:
            summary, text = pickle.loads(reply[1:])
            error = CallbackProcessError(f"could not load the subscriber's program: {summary}")
            error.__cause__ = ChildTraceback(text)
            self._stop_child()
            raise _Dead(error, f"process failed to start: {summary}")

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
            self._send(_child.CALL + payload)
            ok, value = pickle.loads(self._await(progress=False)[1:])
        except _Dead as dead:
            self._died(None, dead, "call")
            outcome.settle(_raise, CallbackProcessError(f"subscriber {self.name!r}: {dead.reason}"))
            return
        if ok:
            outcome.settle(_identity, value)
        else:
            outcome.settle(_raise, _rebuild(value))

    def _handle(self, batch: list[Entry]) -> None:
        started = time.perf_counter()
        if self._dead:
            self._drop(batch)
            return
        buf = bytearray(_child.BATCH)
        buf += bytes((self._flushes, only_failures(batch)))
        self._encoder.encode_into(batch, buf, len(buf))
        self._batch_base = base = self._counter.value
        self._batch_failures = 0
        self._in_batch = True
        try:
            self._send(bytes(buf))
            self._await(progress=True, batch=batch)
        except _Dead as dead:
            handled = self._counter.value - base
            with self._lock:
                if self._abandoned:
                    return
                self.delivered += handled - self._batch_failures
                rest = len(batch) - handled
                if rest > 0:
                    self.dropped_stuck += rest - 1
                self._in_batch = False
            event = batch[handled][1] if rest > 0 else None
            self._died(event, dead, "" if rest > 0 else "on_batch_end")
        else:
            with self._lock:
                if not self._abandoned:
                    self.delivered += len(batch) - self._batch_failures
                    self._in_batch = False
        self.seconds += time.perf_counter() - started

    def _drop(self, batch: list[Entry]) -> None:
        with self._lock:
            if not self._abandoned:
                self.dropped_stuck += len(batch)

    def _call_hook(self, hook: Any, slot: str, *, quiet: bool = False) -> None:
        """``on_start``/``on_close``: run in the child (the hook itself was shipped)."""
        if self._dead:
            return
        try:
            self._send(_child.HOOK + slot.encode())
            self._await(progress=False)
        except _Dead as dead:
            self._died(None, dead, slot)

    def _end(self) -> None:
        self._stop_child()

    def _stop_child(self) -> None:
        proc = self._process
        if proc is None:
            return
        if not self._dead:
            with contextlib.suppress(_Dead):
                self._send(_child.END)
                self._read_until_exit()
        proc.join(_EXIT_GRACE)
        if proc.is_alive():
            proc.kill()
            proc.join()
        _LIVE.discard(proc)
        self._conn.close()
        with contextlib.suppress(ValueError):  # still running after all: left to atexit
            proc.close()
        self._process = None

    # -- talking to the child (feeder thread) -----------------------------------

    def _read_until_exit(self) -> None:
        """After ``END``: take what the child still sends (its last output lines; a
        child blocked on a full pipe could not exit) until it closes the pipe."""
        conn, proc = self._conn, self._process
        deadline = time.monotonic() + _EXIT_GRACE
        while (left := deadline - time.monotonic()) > 0:
            ready = multiprocessing.connection.wait([conn, proc.sentinel], left)
            if conn not in ready:
                return  # it ended (or the grace passed)
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):
                return
            if message[:1] not in _REPLIES:
                self._message(message, None)

    def _send(self, data: bytes) -> None:
        try:
            self._conn.send_bytes(data)
        except OSError:  # a broken pipe: the child is gone
            raise self._death(None) from None

    def _await(
        self, *, progress: bool, batch: list[Entry] | None = None, timed: bool = True
    ) -> bytes:
        """Read the child's messages until its reply (returned); raise :class:`_Dead`
        when it dies, or after killing it when ``timeout`` passes without progress
        (per event with ``progress``: the shared counter moves after each)."""
        conn, proc = self._conn, self._process
        timeout = self.timeout if timed else None
        counter = self._counter
        last, since = counter.value, time.monotonic()
        while True:
            wait_for: float | None = None
            if timeout is not None:
                now = time.monotonic()
                if progress and counter.value != last:
                    last, since = counter.value, now
                left = since + timeout - now
                if left <= 0:
                    proc.kill()
                    self._drain(batch)
                    proc.join()
                    error = TimeoutError(f"no progress for {timeout}s; the process was killed")
                    raise _Dead(error, f"killed after hook_timeout ({timeout}s)")
                # look at the counter a few times per timeout: the kill is at most late by this
                wait_for = min(left, timeout / 8) if progress else left
            if wait_for is None:
                # nothing to time: block in the read (the child's death is its end of file)
                ready: list[Any] = [conn]
            else:
                ready = multiprocessing.connection.wait([conn, proc.sentinel], wait_for)
            if conn in ready:
                try:
                    message = conn.recv_bytes()
                except (EOFError, OSError):
                    raise self._death(batch) from None
                if message[:1] in _REPLIES:
                    return bytes(message)
                self._message(message, batch)
            elif ready:  # the sentinel: it ended (what it sent before is read first)
                raise self._death(batch)

    def _drain(self, batch: list[Entry] | None) -> None:
        """After a death: take what the child sent before it (its failures first)."""
        conn = self._conn
        try:
            while conn.poll(0):
                message = conn.recv_bytes()
                if message[:1] not in _REPLIES:
                    self._message(message, batch)
        except (EOFError, OSError):
            pass

    def _death(self, batch: list[Entry] | None) -> _Dead:
        self._drain(batch)
        proc = self._process
        proc.join(_EXIT_GRACE)
        if proc.is_alive():  # it closed the pipe and lives on: it is no use any more
            proc.kill()
            proc.join()
        reason = f"process died: {_exit_text(proc.exitcode)}"
        return _Dead(CallbackProcessError(reason), reason)

    def _died(self, event: Event | None, dead: _Dead, slot: str) -> None:
        """Count the death (the event in hand failed, or the hook), report it once."""
        with self._lock:
            if self._abandoned:
                return
            self._dead = True
            self.disabled = dead.reason
            self.last_error = dead.error
            if event is None:
                self.hook_failures += 1
            else:
                self.failed += 1
        self.engine.failed(self, event, dead.error, slot)
        self.engine.wake_from_thread()  # barriers stop waiting for it

    def _message(self, message: bytes, batch: list[Entry] | None) -> None:
        tag, payload = message[:1], message[1:]
        if tag == _child.FAILED:
            index, slot, quiet, failure = pickle.loads(payload)
            event = batch[index][1] if batch is not None and index >= 0 else None
            with self._lock:
                if self._abandoned:
                    return
                self.last_error = exc = _rebuild(failure)
                if event is None:
                    self.hook_failures += 1
                else:
                    self.failed += 1
                    self._batch_failures += 1
            self.engine.failed(self, event, exc, slot, quiet=quiet)
        elif tag == _child.REQUEST:
            self._request(pickle.loads(payload))
        elif tag == _child.LOG:
            _relog(*pickle.loads(payload))
        elif tag == _child.OUT:
            stream, text = pickle.loads(payload)
            out = sys.stdout if stream == 1 else sys.stderr
            try:
                out.write(text)
                out.flush()
            except Exception:  # a closed stream must not end the delivery
                pass

    def _request(self, request: Any) -> None:
        if self.on_request is None:
            return
        try:
            self.on_request(request)
        except Exception as exc:
            _log.warning(
                "a request from a callback's process failed",
                callback=self.name,
                error=describe(exc),
                exc_info=exc,
            )


_REPLIES = (_child.READY, _child.BROKEN, _child.DONE, _child.RESULT)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _rebuild(failure: _child.Failure) -> BaseException:
    """The child's exception, rebuilt here when it unpickles, with the child's
    traceback text as its ``__cause__``."""
    data, summary, text = failure
    exc: BaseException | None = None
    if data is not None:
        try:
            exc = pickle.loads(data)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = CallbackProcessError(summary)
    exc.__cause__ = ChildTraceback(text)
    return exc


def _levels() -> dict[str, int]:
    """The levels set on this process's loggers: the child's records are filtered as
    they would be here (fewer cross)."""
    levels = {"evsys_async": logging.getLogger("evsys_async").getEffectiveLevel()}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def _relog(name: str, level: int, message: str, exc_text: str | None) -> None:
    """Re-emit a child's log record through this process's logger of the same name."""
    logger = logging.getLogger(name)
    if not logger.isEnabledFor(level):
        return
    record = logging.makeLogRecord(
        {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": message}
    )
    record.exc_text = exc_text or None
    logger.handle(record)


def _raise(exc: BaseException) -> Any:
    raise exc


def _identity(value: Any) -> Any:
    return value
