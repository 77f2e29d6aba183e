"""The child side of a subscriber in its own process (``process.py`` and ``spawn.py``
are the parent's side, ``docs/isolation.md`` the user's view).

:func:`main` runs in a process started by ``multiprocessing`` (forkserver on
Linux, else spawn; never a plain fork of a process with threads). It gets one
end of a pipe, a shared counter and the pickled *program*: the handler and its
``on_start``/``on_batch_end``/``on_close`` hooks, pickled together so that
bound methods share their instance here. Then:

* it ignores SIGINT (Ctrl-C reaches the parent, which ends the children
  through its shutdown), asks the kernel for SIGKILL when its parent dies
  (Linux), and reads the pipe in a thread of its own whose end of file means
  the parent is gone: ``os._exit`` at once, even while a hook computes;
* it runs an event loop of the parent's backend: an ``async def`` handler
  runs there, a ``def`` one in a :class:`~evsys_async._util.worker.DaemonWorker`
  thread (whose ``async def`` hooks reach the loop through its token);
* log records and stdout/stderr lines go to the parent, which re-emits them;
* after each event it bumps the shared counter, after sending a message for
  a failure, so a parent that sees it die knows each event's fate.

The messages are ``wire.py``'s. From any thread of this process,
:func:`request_parent` hands bytes to the subscriber's ``on_request`` in the
parent (``evsys_async.bus.request_parent`` is its public path).
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import inspect
import io
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import msgspec

from ..._util.aio import LoopWaker
from ..._util.worker import DaemonWorker
from ...errors import describe
from ...events import Envelope, decode
from . import wire
from .failures import in_a_row

__all__ = ["in_subscriber_process", "main", "request_parent"]

_PR_SET_PDEATHSIG = 1

_link: _Link | None = None


def in_subscriber_process() -> bool:
    """True in a subscriber's own process (``isolation="process"``), on any of its
    threads; False everywhere else."""
    return _link is not None


def request_parent(message: bytes) -> None:
    """Send ``message`` to the subscriber's ``on_request`` in the parent process.

    Call it from the handler or a hook of a subscriber that runs in its own
    process (``isolation="process"``), from any thread of that process. It
    returns once the bytes are written to the pipe (it does not wait for the
    parent to apply them); the parent's feeder thread hands them to
    ``on_request(message)`` before the batch in hand counts as handled, so a
    barrier (``Subscription.wait``, ``publish_and_wait``) that returns has
    seen the requests of the events it waited for. The bus does not read the
    bytes: encode what you send and decode it in ``on_request``
    (``msgspec.msgpack`` and a tagged Struct is what the callbacks use). What
    ``on_request`` raises is logged in the parent as a WARNING; a subscriber
    without ``on_request`` drops them.

    Raises ``TypeError`` for anything but bytes, and ``RuntimeError`` outside
    a subscriber's own process (in the parent, call the code directly).
    """
    if not isinstance(message, bytes | bytearray | memoryview):
        raise TypeError(
            f"request_parent() sends bytes, got {type(message).__name__}; encode it first, "
            "e.g. msgspec.msgpack.encode(obj)"
        )
    if _link is None:
        raise RuntimeError(
            "request_parent() works only in a subscriber's own process "
            "(subscribe(..., isolation='process')); here, call on_request's code directly"
        )
    _link.send(wire.Request(bytes(message)))


class _Link:
    """The child's end of the pipe: sends from any thread, one at a time."""

    def __init__(self, conn: Any, counter: Any) -> None:
        self.conn = conn
        self.counter = counter
        self._lock = threading.Lock()

    def send(self, message: wire.ToParent) -> None:
        data = wire.encode(message)
        with self._lock:
            self.conn.send_bytes(data)


def main(conn: Any, counter: Any, settings: wire.Settings, program: bytes) -> None:
    """The child process's entry point (see the module docstring)."""
    global _link
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    link = _link = _Link(conn, counter)
    _forward_logs(link, settings)
    _forward_output(link)
    with contextlib.suppress(Exception):  # a segfault's Python stack reaches stderr
        faulthandler.enable(file=2)
    code = 0
    try:
        anyio.run(_Child(link, settings, program).serve, backend=settings.backend)
    except BaseException:  # a message it does not know: the parent reports the exit
        traceback.print_exc()
        code = 1
    _exit_now(code)


def _exit_now(code: int) -> None:
    """The program has ended (its ``on_close`` ran, or it never loaded): leave now.

    Not through the interpreter's exit, which joins every non-daemon thread the
    callback left running (a client's flusher, a pool): the process would live
    on until the parent killed it at its deadline. What the callback printed
    or logged has been sent; ``os._exit`` ends the threads with the process.
    """
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent thread's process dies (best effort;
    under forkserver the parent is the server, so the pipe's reader watches too)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class _Child:
    """Loads the program and runs what the parent sends, in order."""

    def __init__(self, link: _Link, settings: wire.Settings, program: bytes) -> None:
        self.link = link
        self.settings = settings
        self.program = program
        self.inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.is_async = settings.is_async
        self.envelopes = settings.envelopes
        self.bus_id = settings.bus_id
        self._ready: anyio.Event | None = None
        self.token: Any = None
        self.worker: DaemonWorker | None = None
        #: failures in a row, and the limit at which the handler is switched off
        self.limit = settings.max_consecutive_failures
        self.streak = 0
        self.disabled: str | None = None
        #: (event type or hook, exception type) already sent in full
        self.sent: set[tuple[str, type]] = set()

    async def serve(self) -> None:
        self.token = anyio.lowlevel.current_token()
        self._ready = anyio.Event()
        waker = LoopWaker()
        threading.Thread(
            target=self._read, args=(waker,), name="evsys-child-reader", daemon=True
        ).start()
        try:  # on the loop: a callback built here may take the loop's token
            handler, on_start, on_batch_end, on_close = pickle.loads(self.program)
        except BaseException as exc:  # whatever it is, the parent reports it
            text = "".join(traceback.format_exception(exc))  # all of it: what failed to load
            self.link.send(wire.Broken(describe(exc), text))
            return
        self.handler = handler
        self.hooks = {"on_start": on_start, "on_batch_end": on_batch_end, "on_close": on_close}
        if not self.is_async:
            self.worker = DaemonWorker("evsys-child-handler")
        self.link.send(wire.Ready())
        try:
            await self._loop()
        finally:
            if self.worker is not None:
                self.worker.close()

    def _read(self, waker: LoopWaker) -> None:
        """The reader thread: hand each message to the loop; the pipe's end of file
        means the parent is gone, and then so is this process."""
        conn, inbox = self.link.conn, self.inbox
        try:
            while True:
                inbox.put(conn.recv_bytes())
                waker.soon(self._wake)
        except BaseException:  # EOF, a broken pipe: the parent has ended
            os._exit(0)

    def _wake(self) -> None:
        assert self._ready is not None
        self._ready.set()

    async def _next(self) -> bytes:
        while True:
            try:
                return self.inbox.get_nowait()
            except queue.Empty:
                pass
            assert self._ready is not None
            await self._ready.wait()
            self._ready = anyio.Event()

    async def _loop(self) -> None:
        """Run what the parent sends, in order, until ``End``. A message this end does
        not know raises (naming it): the process ends and the parent reports it."""
        send = self.link.send
        while True:
            message = wire.decode_from_parent(await self._next())
            if isinstance(message, wire.Batch):
                await self._batch(message)
                send(wire.Done())
            elif isinstance(message, wire.RunHook):
                await self._hook(message.slot, False)
                send(wire.Done())
            elif isinstance(message, wire.Call):
                send(await self._call(message.fn))
            else:  # End
                return

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` where the handler runs (its thread for a ``def`` program,
        else the loop); an awaitable it returns is awaited on the loop."""
        if self.worker is not None:
            return await self.worker.call(self._sync, fn, *args)
        result = fn(*args)
        if inspect.isawaitable(result):
            return await result
        return result

    def _sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """In the handler's thread: an awaitable that ``fn`` returns (a callback's
        ``async def`` hook) is awaited on the loop, through its token."""
        result = fn(*args)
        if inspect.isawaitable(result):
            return anyio.from_thread.run(_wait_for, result, token=self.token)
        return result

    async def _batch(self, batch: wire.Batch[msgspec.Raw]) -> None:
        items = batch.items
        if self.disabled is not None:  # the parent sends none after Disabled; if it did
            self.link.send(wire.Disabled(self.disabled, 0))
            return
        if self.worker is None:
            await self._events_async(items)
        else:
            await self.worker.call(self._events_sync, items)
        if batch.flush and self.disabled is None:
            await self._hook("on_batch_end", batch.quiet)

    def _events_sync(self, items: list[tuple[int, msgspec.Raw]]) -> None:
        handler, counter, token = self.handler, self.link.counter, self.token
        envelopes, bus_id = self.envelopes, self.bus_id
        for i, (seq, raw) in enumerate(items):
            event: Any = None
            try:
                event = decode(raw, format="msgpack")
                result = handler(Envelope(bus_id, seq, event) if envelopes else event)
                if inspect.isawaitable(result):  # a callback's async hook, from its thread
                    anyio.from_thread.run(_wait_for, result, token=token)
            except BaseException as exc:  # in its own process, anything is its failure
                self._failed(i, type(event).__name__, False, exc)
            else:
                self.streak = 0
            counter.value += 1
            if self.disabled is not None:
                self.link.send(wire.Disabled(self.disabled, i + 1))
                return

    async def _events_async(self, items: list[tuple[int, msgspec.Raw]]) -> None:
        handler, counter = self.handler, self.link.counter
        envelopes, bus_id = self.envelopes, self.bus_id
        for i, (seq, raw) in enumerate(items):
            event: Any = None
            try:
                event = decode(raw, format="msgpack")
                result = handler(Envelope(bus_id, seq, event) if envelopes else event)
                if inspect.isawaitable(result):
                    await result
            except BaseException as exc:  # nothing cancels this loop but its end
                self._failed(i, type(event).__name__, False, exc)
            else:
                self.streak = 0
            counter.value += 1
            if self.disabled is not None:
                self.link.send(wire.Disabled(self.disabled, i + 1))
                return

    async def _hook(self, slot: str, quiet: bool) -> None:
        """Run hook ``slot`` where the handler runs; what it raises is its failure."""
        hook = self.hooks.get(slot)
        if hook is None:
            return
        try:
            await self._run(hook)
        except BaseException as exc:  # in its own process, anything is its failure
            self._failed(-1, slot, quiet, exc, slot=slot)

    async def _call(self, fn: bytes) -> wire.Returned | wire.Raised:
        """``Subscription.call``: run the pickled function where the handler runs."""
        try:
            value = await self._run(pickle.loads(fn))
            data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # fails here
        except BaseException as exc:  # handed back to the caller
            return wire.Raised(wire.failure_of(exc))
        return wire.Returned(data)

    def _failed(
        self, index: int, what: str, quiet: bool, exc: BaseException, *, slot: str = ""
    ) -> None:
        """Tell the parent, before the counter moves (a parent that sees the count sees
        the failure): the first of its kind (``what``: event type or hook) in full,
        a later one by its exception type's name only; switch the handler off at
        its limit of failures in a row (``_events_*`` then tell the parent)."""
        key = (what, type(exc))
        if key in self.sent:
            self.link.send(wire.Failed(index, slot, quiet, None, type(exc).__name__))
        else:
            self.sent.add(key)
            self.link.send(wire.Failed(index, slot, quiet, wire.failure_of(exc)))
        if index < 0 or self.limit is None:
            return
        self.streak += 1
        if self.streak >= self.limit:
            self.disabled = in_a_row(self.limit, describe(exc))


async def _wait_for(awaitable: Any) -> Any:
    return await awaitable


# -- logs and output to the parent ---------------------------------------------------


class _ShipLogs(logging.Handler):
    """Sends each record's name, level, message and exception text to the parent."""

    def __init__(self, link: _Link) -> None:
        super().__init__()
        self.link = link

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.exc_text
            if record.exc_info and not text:
                text = "".join(traceback.format_exception(*record.exc_info))
            self.link.send(wire.Log(record.name, record.levelno, record.getMessage(), text))
        except Exception:
            self.handleError(record)


def _forward_logs(link: _Link, settings: wire.Settings) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ShipLogs(link))
    root.setLevel(settings.root_level)
    for name, level in settings.levels.items():
        logging.getLogger(name).setLevel(level)


class _Lines(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of the child: each whole line goes to the parent."""

    def __init__(self, link: _Link, stream: Literal[1, 2]) -> None:
        self.link = link
        self.stream = stream
        self._buf = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self._lock:
            self._buf += text
            if "\n" in self._buf:
                whole, _, self._buf = self._buf.rpartition("\n")
                self.link.send(wire.Output(self.stream, whole + "\n"))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                text, self._buf = self._buf, ""
                self.link.send(wire.Output(self.stream, text))


def _forward_output(link: _Link) -> None:
    sys.stdout = _Lines(link, 1)
    sys.stderr = _Lines(link, 2)
