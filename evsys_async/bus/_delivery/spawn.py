"""The parent's end of one subscriber's process: start it, talk to it, end it.

:class:`ChildProcess` starts the child (``child.main``) with ``forkserver``
where there is one (Linux), else ``spawn`` — never a plain fork of a process
that has threads; ``$EVSYS_START_METHOD`` picks one — and speaks the wire
(``wire.py``) over a pipe. Only the feeder thread of its delivery talks to it
and reaps it (two threads reaping one child race); :meth:`ChildProcess.kill`
works from any thread.

:meth:`ChildProcess.await_reply` blocks (the GIL released) until the child's
reply, handing every other message to the caller as it comes, and raises
:class:`Dead` when the child dies, or after killing it when ``timeout``
passes without progress: per event when ``progress`` is asked (the child
bumps a shared counter after each event), else per hook or call.

Children still running at interpreter exit (their bus never closed) are
killed before multiprocessing joins them.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import multiprocessing
import multiprocessing.connection
import multiprocessing.util  # its exit handler first, so that ours runs before it
import os
import pickle
import signal
import sys
import time
import types
import weakref
from collections.abc import Callable
from typing import Any

from ..._util.log import get_logger
from ...errors import CallbackProcessError, describe
from . import child, wire

__all__ = [
    "START_METHOD_ENV",
    "ChildProcess",
    "Dead",
    "OnMessage",
    "dumps_for_child",
    "main_importable",
    "start_method",
]

_log = get_logger()

#: how long a child that was told to end may take before it is killed
EXIT_GRACE = 5.0
#: the environment variable that picks the start method ("spawn" or "forkserver")
START_METHOD_ENV = "EVSYS_START_METHOD"

#: what the feeder does with a message that is not a reply (a failure, a request, ...)
OnMessage = Callable[[wire.ToParent], None]

#: children still running, killed at interpreter exit if their bus never closed
_LIVE: weakref.WeakSet[Any] = weakref.WeakSet()


def start_method() -> str:
    """``$EVSYS_START_METHOD`` if set, else ``forkserver`` where available, else ``spawn``.
    Raises ``ValueError`` for a method that is not one of those or not available here."""
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


def main_importable() -> bool:
    """A child can import what ``__main__`` defines: it runs a script from its file, or
    a module by name (``python -m``); not a notebook or ``python -c``, whose
    ``__main__`` has neither (multiprocessing prepares a child from these two)."""
    main = sys.modules.get("__main__")
    if main is None:
        return False
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) is not None or bool(getattr(main, "__file__", None))


class _Pickler(pickle.Pickler):
    """Pickles as ``pickle.dumps`` does, noting every class and function it pickles by
    reference from ``__main__``."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.from_main: list[str] = []

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type | types.FunctionType) and obj.__module__ == "__main__":
            self.from_main.append(obj.__qualname__)
        return NotImplemented


def dumps_for_child(obj: Any) -> tuple[bytes, list[str]]:
    """``obj`` pickled for a child process, and the names of the classes and functions
    of ``__main__`` it refers to that a child cannot import (see
    :func:`main_importable`); raises what ``pickle`` raises."""
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    unreachable = [] if main_importable() else list(dict.fromkeys(pickler.from_main))
    return buf.getvalue(), unreachable


@atexit.register
def _kill_leftovers() -> None:  # registered after multiprocessing's: runs before its joins
    for proc in list(_LIVE):
        with contextlib.suppress(ValueError, OSError):
            if not multiprocessing.connection.wait([proc.sentinel], 0):
                proc.kill()


class Dead(Exception):
    """The child ended (or was killed) while the feeder waited; ``error`` is what to
    report, ``reason`` the subscriber's ``disabled`` text."""

    def __init__(self, error: BaseException, reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason


class ChildProcess:
    """One subscriber's process, seen from the parent (see the module docstring)."""

    def __init__(
        self, name: str, settings: wire.Settings, program: bytes, on_message: OnMessage
    ) -> None:
        self.name = name
        self.settings = settings
        self.program = program
        #: gets every message that is not a reply, in the feeder thread, as it comes
        self.on_message = on_message
        #: events the child has handled, ever (shared memory; the child bumps it)
        self.counter: Any = None
        self._process: Any = None
        self._conn: Any = None

    @property
    def started(self) -> bool:
        return self._process is not None

    def start(self) -> wire.ToParent:
        """Start the child and wait until its program is loaded: its reply, ``Ready`` or
        ``Broken``. Raises :class:`Dead` if it cannot start or dies first."""
        ctx = _context()
        parent_end, child_end = ctx.Pipe()
        try:
            self.counter = ctx.RawValue("q", 0)
            proc = ctx.Process(
                target=child.main,
                args=(child_end, self.counter, self.settings, self.program),
                name=f"evsys-sub:{self.name}",
            )
            proc.start()
        except Exception as exc:
            parent_end.close()
            child_end.close()
            raise Dead(exc, f"process failed to start: {describe(exc)}") from None
        # the parent's copy of the child's end must go, or the child's death is no EOF
        child_end.close()
        self._process, self._conn = proc, parent_end
        _LIVE.add(proc)
        return self.await_reply(timeout=None, progress=False)

    def send(self, message: wire.ToChild | wire.Batch[Any]) -> None:
        """One message to the child; :class:`Dead` if the pipe is broken."""
        try:
            self._conn.send_bytes(wire.encode(message))
        except OSError:  # a broken pipe: the child is gone
            raise self._death() from None

    def await_reply(self, *, timeout: float | None, progress: bool) -> wire.ToParent:
        """Read the child's messages until its reply (returned), each other one to
        :attr:`on_message`; raise :class:`Dead` when it dies, or after killing it when
        ``timeout`` passes without progress (per event with ``progress``)."""
        conn, proc, on_message = self._conn, self._process, self.on_message
        counter = self.counter
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
                    self.drain()
                    proc.join()
                    error = TimeoutError(f"no progress for {timeout}s; the process was killed")
                    raise Dead(error, f"killed after hook_timeout ({timeout}s)")
                # look at the counter a few times per timeout: the kill is at most late by this
                wait_for = min(left, timeout / 8) if progress else left
            if wait_for is None:
                # nothing to time: block in the read (the child's death is its end of file)
                ready: list[Any] = [conn]
            else:
                ready = multiprocessing.connection.wait([conn, proc.sentinel], wait_for)
            if conn in ready:
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    raise self._death() from None
                message = self._decode(data)
                if isinstance(message, wire.REPLIES):
                    return message
                on_message(message)
            elif ready:  # the sentinel: it ended (what it sent before is read first)
                raise self._death()

    def _decode(self, data: bytes) -> wire.ToParent:
        """A message of the child's; one this end does not know ends the child (the two
        ends no longer agree, so nothing it says can be trusted)."""
        try:
            return wire.decode_from_child(data)
        except CallbackProcessError as exc:
            self.kill(wait=True)
            self.drain()
            raise Dead(exc, "killed: it sent a message this end does not know") from None

    def _late(self, data: bytes) -> wire.ToParent | None:
        """A message of a child that has died or is ending; one this end does not know
        is logged (there is nothing left to end)."""
        try:
            return wire.decode_from_child(data)
        except CallbackProcessError as exc:
            _log.warning("callback process: unknown message", callback=self.name, error=str(exc))
            return None

    def drain(self) -> None:
        """After a death: take what the child sent before it (its failures first)."""
        conn, on_message = self._conn, self.on_message
        try:
            while conn.poll(0):
                message = self._late(conn.recv_bytes())
                if message is not None and not isinstance(message, wire.REPLIES):
                    on_message(message)
        except (EOFError, OSError):
            pass

    def _death(self) -> Dead:
        self.drain()
        proc = self._process
        proc.join(EXIT_GRACE)
        if proc.is_alive():  # it closed the pipe and lives on: it is no use any more
            proc.kill()
            proc.join()
        reason = f"process died: {exit_text(proc.exitcode)}"
        return Dead(CallbackProcessError(reason), reason)

    def kill(self, *, wait: bool = False) -> None:
        """SIGKILL the child (any thread); with ``wait``, until it has ended. Only the
        feeder thread reaps it (``join``): two threads reaping one child race."""
        proc = self._process
        with contextlib.suppress(ValueError, OSError):  # closed meanwhile: it has ended
            # its sentinel, not exitcode/is_alive(): those reap it (waitpid) from this thread
            if proc is not None and not multiprocessing.connection.wait([proc.sentinel], 0):
                proc.kill()
                if wait:
                    multiprocessing.connection.wait([proc.sentinel], EXIT_GRACE)

    def stop(self, *, alive: bool) -> None:
        """End the child: with ``alive``, tell it to (``End``) and take its last messages
        until it exits; then reap it (killed past the grace) and close the pipe."""
        proc = self._process
        if proc is None:
            return
        if alive:
            with contextlib.suppress(Dead):
                self.send(wire.End())
                self._read_until_exit()
        proc.join(EXIT_GRACE)
        if proc.is_alive():
            if alive:  # it exits at once after End (child._exit_now): something is wrong
                _log.warning(
                    "callback process did not exit after its end; killed",
                    callback=self.name,
                    grace_seconds=EXIT_GRACE,
                )
            proc.kill()
            proc.join()
        _LIVE.discard(proc)
        self._conn.close()
        with contextlib.suppress(ValueError):  # still running after all: left to atexit
            proc.close()
        self._process = None

    def _read_until_exit(self) -> None:
        """After ``End``: take what the child still sends (its last output lines; a child
        blocked on a full pipe could not exit) until it closes the pipe."""
        conn, proc, on_message = self._conn, self._process, self.on_message
        deadline = time.monotonic() + EXIT_GRACE
        while (left := deadline - time.monotonic()) > 0:
            ready = multiprocessing.connection.wait([conn, proc.sentinel], left)
            if conn not in ready:
                return  # it ended (or the grace passed)
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                return
            message = self._late(data)
            if message is not None and not isinstance(message, wire.REPLIES):
                on_message(message)


def exit_text(code: int | None) -> str:
    """``"SIGKILL"``, ``"exit code 3"``: how a process ended, for ``disabled``."""
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
