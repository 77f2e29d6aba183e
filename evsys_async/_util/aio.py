"""The async utilities the rest of the package shares, for asyncio and trio alike.

* :func:`is_async_callable` — is this handler, hook or step ``async def``?
* :class:`LoopWaker` — the one way to run a callback on the event loop from
  another thread without waiting for it (``call_soon_threadsafe`` on asyncio,
  ``run_sync_soon`` on trio). ``anyio.from_thread.run_sync`` would block the
  calling thread until the loop got to it.
* :func:`shielded` and :func:`absorb_native_cancel` — finish a shutdown even
  when a *native* asyncio cancellation (uvicorn's shutdown, a nested
  ``asyncio.timeout``) pierces anyio's shield.
* :func:`undo_self_cancel` — withdraw the cancel request a handler made on its
  own asyncio task.
* :class:`Deadline` — one deadline, several waits under it.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.lowlevel

__all__ = [
    "Deadline",
    "LoopWaker",
    "absorb_native_cancel",
    "current_task_getter",
    "is_async_callable",
    "on_asyncio",
    "shielded",
    "undo_self_cancel",
]

T = TypeVar("T")


def is_async_callable(fn: Any) -> bool:
    """True if ``fn``, its ``__call__`` or the function in a ``partial`` is a coroutine function."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's coroutine __call__
    )


def on_asyncio() -> bool:
    """True when the running event loop is asyncio's (anyio's token holds the native
    loop: an asyncio loop, or trio's ``TrioToken``)."""
    return hasattr(anyio.lowlevel.current_token().native_token, "call_soon_threadsafe")


class LoopWaker:
    """Runs callbacks on the event loop it was made on, from any thread, without waiting.

    Made on the loop. :meth:`soon` never blocks the calling thread and never
    raises: if the loop is gone it returns ``False``. The callback runs on the
    loop as a plain callback and must not raise. On trio the request is
    idempotent: a burst of identical wakes costs one callback.
    """

    __slots__ = ("_soon", "asyncio", "token")

    def __init__(self) -> None:
        self.token = anyio.lowlevel.current_token()
        native: Any = self.token.native_token
        self.asyncio = hasattr(native, "call_soon_threadsafe")
        self._soon: Callable[[Callable[[], object]], object] = (
            native.call_soon_threadsafe if self.asyncio else functools.partial(_trio_soon, native)
        )

    def soon(self, fn: Callable[[], object]) -> bool:
        """Run ``fn()`` on the loop soon; ``False`` if the loop has ended."""
        try:
            self._soon(fn)
        except RuntimeError:  # the event loop is closed; nobody is left to wake
            return False
        return True


def _trio_soon(token: Any, fn: Callable[[], object]) -> None:
    token.run_sync_soon(fn, idempotent=True)


def current_task_getter() -> Callable[[], Any]:
    """``asyncio.current_task`` on asyncio; on trio a function returning ``None`` (a
    trio task cannot cancel itself, so there is nothing to undo)."""
    if on_asyncio():
        import asyncio

        return asyncio.current_task
    return _no_task


def _no_task() -> None:
    return None


async def undo_self_cancel(task: Any, base: int, scope: anyio.CancelScope) -> None:
    """asyncio: withdraw the cancel requests a handler made on its own task, down to
    ``base`` (the task's ``cancelling()`` before the handler ran).

    ``uncancel`` takes back the request, but before Python 3.13 a cancel that
    has not landed yet stays armed: it is let land here, where it is caught.
    The caller's own cancellation (``scope``) still propagates.
    """
    import asyncio

    while task.cancelling() > base:
        task.uncancel()
    if scope.cancel_called:
        return
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        if scope.cancel_called:
            raise
        while task.cancelling() > base:
            task.uncancel()


async def shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end even if the caller is cancelled, then re-raise that.

    anyio's shield covers anyio's cancellation; on asyncio a native
    ``task.cancel()`` (uvicorn's shutdown, a nested ``asyncio.timeout``) pierces
    it, so there ``coro`` runs in a task of its own behind ``asyncio.shield``.
    """
    cancel: BaseException | None = None
    with anyio.CancelScope(shield=True):
        if not on_asyncio():
            return await coro  # trio: the shield is enough
        import asyncio

        task = asyncio.ensure_future(coro)
        while True:
            try:
                result = await asyncio.shield(task)
                break
            except asyncio.CancelledError as exc:
                if task.done():
                    raise
                cancel = exc
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
    if cancel is not None:
        raise cancel
    return result


def absorb_native_cancel(exc: BaseException, deadline: Deadline) -> bool:
    """True if ``exc`` is a native asyncio cancellation to hold until a shielded wait
    under ``deadline`` ends.

    The task's cancel request is withdrawn (``uncancel``) so anyio's own scopes
    inside the wait keep working; the caller re-raises ``exc`` afterwards.
    """
    import asyncio

    if not isinstance(exc, asyncio.CancelledError) or deadline.passed:
        return False
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    return True


class Deadline:
    """A point in ``time.monotonic()`` time; ``None`` timeout means never."""

    __slots__ = ("started", "when")

    def __init__(self, timeout: float | None) -> None:
        self.started = time.monotonic()
        self.when = math.inf if timeout is None else self.started + timeout

    def elapsed(self) -> float:
        """Seconds since the deadline was set."""
        return time.monotonic() - self.started

    def remaining(self) -> float | None:
        """Seconds left (never negative), or ``None`` without a deadline: a ``timeout=``."""
        return None if self.when == math.inf else max(0.0, self.when - time.monotonic())

    def left(self) -> float:
        """Seconds left, never negative (``inf`` without a deadline)."""
        return max(0.0, self.when - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.when
