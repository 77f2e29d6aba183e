"""A dedicated daemon thread that runs calls one at a time, awaited from async code.

A ``def`` step or hook runs in one thread of its own for its whole life
(thread-local device and autocast state stay put, a hung call starves nobody),
and the thread is a daemon so an abandoned call never holds the process open.
anyio's ``to_thread`` pool is neither.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import anyio

from .aio import LoopWaker

__all__ = ["DaemonWorker", "Outcome", "in_daemon_thread"]

_Job = tuple[Callable[..., Any], tuple[Any, ...], "Outcome"]
#: wakes a serve(until=...) without a call
_NUDGE: Any = object()


class Outcome:
    """A result handed from a thread to an awaiting task: ``settle`` in the thread,
    ``await result()`` on the loop."""

    __slots__ = ("done", "error", "event", "value", "waker")

    def __init__(self, event: anyio.Event, waker: LoopWaker) -> None:
        self.event = event
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self.waker = waker

    @classmethod
    def new(cls, waker: LoopWaker | None = None) -> Outcome:
        """Made on the event loop, by the task that will await it."""
        return cls(anyio.Event(), waker or LoopWaker())

    def settle(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn`` here (a thread) and hand its result or error to the loop, without
        waiting for the loop to take it (a dead loop: nobody awaits it)."""
        try:
            self.value = fn(*args)
        except BaseException as exc:  # handed back to the awaiting task
            self.error = exc
        self.done = True
        self.waker.soon(self.event.set)

    async def result(self) -> Any:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        return self.value


class DaemonWorker:
    """One thread that runs calls; :meth:`call` runs ``fn(*args)`` there and awaits it.

    By default the thread is a daemon of its own, started in a copy of the
    creator's contextvars; ``enter()``, when given, is entered there around
    every call for the thread's life (if entering raises, every call raises
    that). With ``start=False`` no thread is started: the
    caller's thread serves the calls by running :meth:`serve` (``run_sync()``
    keeps a plain script's steps on its main thread that way).

    Calls run in submission order. Cancelling :meth:`call` does not stop the
    thread's call (threads cannot be cancelled): it runs on, its result is
    dropped, and the next call starts after it.
    """

    def __init__(
        self,
        name: str,
        *,
        start: bool = True,
        enter: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._last: Outcome | None = None
        self._waker: LoopWaker | None = None
        #: what entering ``enter()`` raised: every call then raises it
        self._broken: BaseException | None = None
        if start:
            context = contextvars.copy_context()
            thread = threading.Thread(target=context.run, args=(self._live, enter), name=name)
            thread.daemon = True
            thread.start()

    def _live(self, enter: Callable[[], AbstractContextManager[Any]] | None) -> None:
        """The thread's life: ``enter()`` entered around every call (``start=True``)."""
        if enter is None:
            self.serve()
            return
        try:
            entered = enter()
            entered.__enter__()
        except BaseException as exc:  # handed to every call instead
            self._broken = exc
            self.serve()
            return
        try:
            self.serve()
        finally:
            entered.__exit__(None, None, None)

    def serve(self, until: Callable[[], bool] | None = None) -> bool:
        """Run the calls as they come (in the serving thread), until :meth:`close`
        (returns ``False``) or, when given, until ``until()`` is true after a call
        or a :meth:`nudge` (returns ``True``). A call made from inside a call waits
        for this to run it: a thread blocked on the loop serves it meanwhile."""
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.put(None)  # an outer serve() ends too
                return False
            if job is not _NUDGE:
                fn, args, outcome = job
                if self._broken is not None:
                    outcome.settle(_reraise, self._broken)
                else:
                    outcome.settle(fn, *args)
            if until is not None and until():
                return True

    def nudge(self) -> None:
        """Wake a ``serve(until=...)`` to look at its condition again (any thread)."""
        self._queue.put(_NUDGE)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Outcome:
        """Queue ``fn(*args)`` for the worker's thread (on the loop); await
        ``result()`` of what it returns for the result."""
        if self._waker is None:
            self._waker = LoopWaker()
        outcome = Outcome.new(self._waker)
        self._last = outcome
        self._queue.put((fn, args, outcome))
        return outcome

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the worker's thread; re-raise what it raised."""
        return await self.submit(fn, *args).result()

    async def wait_idle(self) -> None:
        """Wait until the latest call submitted has returned (e.g. after cancelling it)."""
        if self._last is not None and not self._last.done:
            await self._last.event.wait()

    @property
    def busy(self) -> bool:
        """The latest call submitted has not returned yet."""
        return self._last is not None and not self._last.done

    def close(self) -> None:
        """Let the thread end after the calls already submitted. Never blocks."""
        self._queue.put(None)


def _reraise(exc: BaseException) -> None:
    raise exc


async def in_daemon_thread(fn: Callable[..., Any], *args: Any, name: str = "evsys-call") -> Any:
    """Run one blocking call ``fn(*args)`` in a daemon thread of its own and await it.

    For a one-off blocking call (a network round trip, a close): unlike anyio's
    pool threads, the thread never holds the process open. Cancelling the await
    abandons the call: it runs on in its thread, its result dropped.
    """
    worker = DaemonWorker(name)
    try:
        return await worker.call(fn, *args)
    finally:
        worker.close()
