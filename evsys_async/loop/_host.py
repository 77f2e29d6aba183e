"""A run on an event loop of its own: ``await loop.run(own_thread=True)``.

A loop run inside a service shares the service's event loop: HTTP parsing,
server-sent events to slow clients and CPU work in request handlers all take
turns with the run's bus, its callbacks and an ``async def`` step. With
``own_thread=True`` the run gets an event loop of its own instead, in a daemon
thread the loop owns (``evsys-run:<key>``, on the caller's backend), and the
caller awaits its result from its own loop, asyncio or trio alike
(docs/design.md, "Threads and tasks"). Work on the service's loop that waits
(a blocked handler, slow clients, I/O) then never delays a step: the run's loop
only ever waits for its own work. Python computation there still shares the
GIL with the run's thread (docs/guide.md, "A run on an event loop of its own").

Why a flag on ``run()`` rather than a host object: the loop already is the
handle a service needs (``subscribe``, ``request_stop``, ``cancel``,
``publish``, ``run_key``, ``artifacts``), each safe from any thread, and the
awaited call keeps ``run()``'s meaning: the artifacts, or the run's exception,
after its shutdown.

Cancelling the awaiting task cancels the run (``loop.cancel``: status
``cancelled``), then waits, shielded, until its shutdown is over (files
complete, manifest written), then re-raises the cancellation. The run's thread
starts with a fresh ``contextvars`` context: anyio keeps the running event
loop's identity there, so the caller's cannot be carried over.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio

from .._util.aio import LoopWaker, on_asyncio, shielded

__all__ = ["run_on_own_loop"]

T = TypeVar("T")


class _Outcome(Generic[T]):
    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: T | None = None
        self.error: BaseException | None = None


async def run_on_own_loop(
    main: Callable[[], Awaitable[T]], *, name: str, on_cancel: Callable[[], object]
) -> T:
    """``main()`` on a new event loop (the caller's backend) in a daemon thread
    ``name``; wait here, without blocking this loop, for its value or its error.

    Cancelled, it calls ``on_cancel()`` (which must make ``main()`` end soon), waits
    shielded for ``main()`` to end, then re-raises the cancellation. Raises what
    ``main()`` raised, unwrapped.
    """
    backend = "asyncio" if on_asyncio() else "trio"
    home = LoopWaker()
    done = anyio.Event()
    outcome: _Outcome[T] = _Outcome()

    def thread_main() -> None:
        try:
            outcome.value = anyio.run(main, backend=backend)
        except BaseException as exc:  # handed to the awaiting task, unwrapped
            outcome.error = exc
        finally:
            home.soon(done.set)  # the caller's loop gone: nobody awaits

    threading.Thread(target=thread_main, name=name, daemon=True).start()
    try:
        await done.wait()
    except anyio.get_cancelled_exc_class():
        on_cancel()
        await shielded(done.wait())  # the run's shutdown: its files complete
        raise
    if outcome.error is not None:
        raise outcome.error
    return outcome.value  # type: ignore[return-value]
