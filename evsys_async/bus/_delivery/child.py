"""The child side of a subscriber in its own process (``_process_delivery.py`` is the
parent's side, ``docs/isolation.md`` the user's view).

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

Wire: every message is ``tag + payload``; a batch is msgpack
(``[[seq, event], ...]``), everything else is pickled.
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
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import msgspec

from ..._util.aio import LoopWaker
from ..._util.traceback import user_traceback
from ..._util.worker import DaemonWorker
from ...errors import describe
from ...events import Envelope, decode

__all__ = ["in_child", "main", "send_request"]

# parent -> child
BATCH = b"B"  # + flush flag + quiet flag + msgpack [[seq, event], ...]
HOOK = b"H"  # + the slot's name: on_start / on_close
CALL = b"C"  # + pickled fn: Subscription.call
END = b"Q"  # exit
# child -> parent
READY = b"r"  # the program is loaded
BROKEN = b"x"  # it could not be: pickled (summary, traceback text)
DONE = b"d"  # the batch (and its flush) or the hook is done
RESULT = b"v"  # a call's result: pickled (True, value) or (False, failure)
FAILED = b"f"  # pickled (index in the batch or -1, slot, quiet, failure)
LOG = b"l"  # pickled (logger name, level, message, exception text)
OUT = b"o"  # pickled (1 or 2, text)
REQUEST = b"q"  # pickled object for the parent's on_request

#: a failure as it crosses: (pickled exception or None, "Type: message", traceback text)
Failure = tuple[bytes | None, str, str]

_PR_SET_PDEATHSIG = 1

_link: _Link | None = None


def in_child() -> bool:
    """True in a subscriber's own process."""
    return _link is not None


def send_request(obj: object) -> None:
    """From any thread of a subscriber's process: hand ``obj`` (pickled) to the
    subscriber's ``on_request`` in the parent, which applies it before the batch in
    hand counts as done. Raises ``RuntimeError`` outside such a process."""
    if _link is None:
        raise RuntimeError("send_request() works only in a subscriber's own process")
    _link.send(REQUEST + pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def failure_of(exc: BaseException) -> Failure:
    """An exception as it crosses to the parent."""
    try:
        data: bytes | None = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        data = None
    return data, describe(exc), user_traceback(exc)  # the callback's frames, not ours


class _Link:
    """The child's end of the pipe: sends from any thread, one at a time."""

    def __init__(self, conn: Any, counter: Any) -> None:
        self.conn = conn
        self.counter = counter
        self._lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self._lock:
            self.conn.send_bytes(data)


def main(conn: Any, counter: Any, settings: dict[str, Any], program: bytes) -> None:
    """The child process's entry point (see the module docstring)."""
    global _link
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    link = _link = _Link(conn, counter)
    _forward_logs(link, settings)
    _forward_output(link)
    with contextlib.suppress(Exception):  # a segfault's Python stack reaches stderr
        faulthandler.enable(file=2)
    anyio.run(_Child(link, settings, program).serve, backend=settings["backend"])


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

    def __init__(self, link: _Link, settings: dict[str, Any], program: bytes) -> None:
        self.link = link
        self.settings = settings
        self.program = program
        self.inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.is_async = bool(settings["is_async"])
        self.envelopes = bool(settings["envelopes"])
        self.bus_id = str(settings["bus_id"])
        self._items = msgspec.msgpack.Decoder(list[tuple[int, msgspec.Raw]])
        self._ready: anyio.Event | None = None
        self.token: Any = None
        self.worker: DaemonWorker | None = None

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
            self.link.send(BROKEN + pickle.dumps((describe(exc), text)))
            return
        self.handler = handler
        self.hooks = {"on_start": on_start, "on_batch_end": on_batch_end, "on_close": on_close}
        if not self.is_async:
            self.worker = DaemonWorker("evsys-child-handler")
        self.link.send(READY)
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
        while True:
            message = await self._next()
            tag, payload = message[:1], message[1:]
            if tag == BATCH:
                await self._batch(payload)
                self.link.send(DONE)
            elif tag == HOOK:
                slot = payload.decode()
                await self._hook(slot, False)
                self.link.send(DONE)
            elif tag == CALL:
                self.link.send(RESULT + pickle.dumps(await self._call(payload)))
            else:  # END
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

    async def _batch(self, payload: bytes) -> None:
        flush, quiet = payload[0] == 1, payload[1] == 1
        items = self._items.decode(payload[2:])
        if self.worker is None:
            await self._events_async(items)
        else:
            await self.worker.call(self._events_sync, items)
        if flush:
            await self._hook("on_batch_end", quiet)

    def _arg(self, seq: int, raw: msgspec.Raw) -> Any:
        event = decode(raw, format="msgpack")
        return Envelope(self.bus_id, seq, event) if self.envelopes else event

    def _events_sync(self, items: list[tuple[int, msgspec.Raw]]) -> None:
        handler, counter, token = self.handler, self.link.counter, self.token
        for i, (seq, raw) in enumerate(items):
            try:
                result = handler(self._arg(seq, raw))
                if inspect.isawaitable(result):  # a callback's async hook, from its thread
                    anyio.from_thread.run(_wait_for, result, token=token)
            except BaseException as exc:  # in its own process, anything is its failure
                self._failed(i, "", False, exc)
            counter.value += 1

    async def _events_async(self, items: list[tuple[int, msgspec.Raw]]) -> None:
        handler, counter = self.handler, self.link.counter
        for i, (seq, raw) in enumerate(items):
            try:
                result = handler(self._arg(seq, raw))
                if inspect.isawaitable(result):
                    await result
            except BaseException as exc:  # nothing cancels this loop but its end
                self._failed(i, "", False, exc)
            counter.value += 1

    async def _hook(self, slot: str, quiet: bool) -> None:
        """Run hook ``slot`` where the handler runs; what it raises is its failure."""
        hook = self.hooks.get(slot)
        if hook is None:
            return
        try:
            await self._run(hook)
        except BaseException as exc:  # in its own process, anything is its failure
            self._failed(-1, slot, quiet, exc)

    async def _call(self, payload: bytes) -> tuple[bool, Any]:
        """``Subscription.call``: run the pickled function where the handler runs."""
        try:
            value = await self._run(pickle.loads(payload))
            pickle.dumps(value)  # fails here, not in the parent
        except BaseException as exc:  # handed back to the caller
            return False, failure_of(exc)
        return True, value

    def _failed(self, index: int, slot: str, quiet: bool, exc: BaseException) -> None:
        # sent before the counter moves: a parent that sees the count sees the failure
        self.link.send(FAILED + pickle.dumps((index, slot, quiet, failure_of(exc))))


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
            data = (record.name, record.levelno, record.getMessage(), text)
            self.link.send(LOG + pickle.dumps(data))
        except Exception:
            self.handleError(record)


def _forward_logs(link: _Link, settings: dict[str, Any]) -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_ShipLogs(link))
    root.setLevel(settings["root_level"])
    for name, level in settings["levels"].items():
        logging.getLogger(name).setLevel(level)


class _Lines(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of the child: each whole line goes to the parent."""

    def __init__(self, link: _Link, stream: int) -> None:
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
                self.link.send(OUT + pickle.dumps((self.stream, whole + "\n")))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                text, self._buf = self._buf, ""
                self.link.send(OUT + pickle.dumps((self.stream, text)))


def _forward_output(link: _Link) -> None:
    sys.stdout = _Lines(link, 1)
    sys.stderr = _Lines(link, 2)
