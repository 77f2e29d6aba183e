"""Where a ``with`` session's event loop runs, and how other threads hand it work.

A trainer that calls ``with Session(...)`` has no event loop of ours to run
the bus on (or has one that it blocks: a notebook cell), so the session runs
its own in a daemon thread, ``evsys-session:<key>`` (docs/design.md,
"Threads and tasks"): a daemon, so a session that is never left never holds
the process open. :class:`SessionThread` starts it and waits for it to be
ready; :class:`LoopJobs` runs plain callbacks on the loop, from any thread, in
the order they were handed over (a bare ``LoopWaker`` on trio may reorder
them), never waiting.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Awaitable, Callable

import anyio

from .._util.aio import LoopWaker

__all__ = ["LoopJobs", "SessionThread"]


class LoopJobs:
    """Plain callbacks run on the event loop it was made on, in order, from any thread.

    Made on the loop. :meth:`soon` never waits; a callback must not raise (it
    runs as a plain callback of the loop). After the loop has ended, what is
    handed over is not run.
    """

    def __init__(self) -> None:
        self._jobs: deque[Callable[[], object]] = deque()
        self._waker = LoopWaker()

    def soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on the loop after what was handed over before it."""
        self._jobs.append(fn)
        self._waker.soon(self._run)

    def _run(self) -> None:
        jobs = self._jobs
        while jobs:
            jobs.popleft()()


class SessionThread:
    """A daemon thread running ``main(ready)`` on an event loop of ``backend``.

    :meth:`start` returns once ``main`` has called ``ready()``, or raises what
    ``main`` raised before it did. :meth:`join` waits for ``main`` to return
    and re-raises what it raised.
    """

    def __init__(self, name: str, backend: str) -> None:
        self.name = name
        self.backend = backend
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, main: Callable[[Callable[[], None]], Awaitable[None]]) -> None:
        """Start the loop; block until ``main`` is ready. Raises what it raised."""

        def body() -> None:
            try:
                anyio.run(main, self._ready.set, backend=self.backend)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
            finally:
                self._ready.set()

        self._thread = thread = threading.Thread(target=body, name=self.name, daemon=True)
        thread.start()
        self._ready.wait()
        if self._error is not None:
            thread.join()
            raise self._error

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the loop to end; ``False`` if it has not. Raises
        what ``main`` raised."""
        assert self._thread is not None  # started
        self._thread.join(timeout)
        if self._error is not None:
            raise self._error
        return not self._thread.is_alive()
