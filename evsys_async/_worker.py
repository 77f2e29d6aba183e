"""A dedicated daemon thread that runs calls one at a time, awaited from async code.

A ``def`` step or hook runs in one thread of its own for its whole life
(thread-local device and autocast state stay put, a hung call starves nobody),
and the thread is a daemon so an abandoned call never holds the process open.
anyio's ``to_thread`` pool is neither.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import anyio

from ._async import LoopWaker

__all__ = ["DaemonWorker", "Outcome"]

_Job = tuple[Callable[..., Any], tuple[Any, ...], "Outcome"]


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
    """One daemon thread; :meth:`call` runs ``fn(*args)`` there and awaits the result.

    Calls run in submission order. Cancelling :meth:`call` does not stop the
    thread's call (threads cannot be cancelled): it runs on, its result is
    dropped, and the next call starts after it.
    """

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._last: Outcome | None = None
        self._waker: LoopWaker | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, args, outcome = job
            outcome.settle(fn, *args)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the worker's thread; re-raise what it raised."""
        return await self.submit(fn, *args).result()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Outcome:
        """Queue ``fn(*args)`` without waiting; ``await outcome.result()`` later.

        Lets a task keep a call in flight while it does other work (replay
        decodes the next block while it publishes this one). On the event loop.
        """
        if self._waker is None:
            self._waker = LoopWaker()
        outcome = Outcome.new(self._waker)
        self._last = outcome
        self._queue.put((fn, args, outcome))
        return outcome

    async def wait_idle(self) -> None:
        """Wait until the latest call submitted has returned (e.g. after cancelling it)."""
        if self._last is not None and not self._last.done:
            await self._last.event.wait()

    def close(self) -> None:
        """Let the thread end after the calls already submitted. Never blocks."""
        self._queue.put(None)
