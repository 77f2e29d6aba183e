"""SIGINT and SIGTERM cancel the run's scope, so the loop's shutdown runs (docs/cli.md).

Used by :meth:`TrainingLoop.run_sync` and the CLI. On trio a bare Ctrl-C is a
``KeyboardInterrupt`` delivered wherever the code happens to be, and on
asyncio it tears the event loop down: either way the shielded shutdown (drain,
teardown, closed files) may be skipped. Here the signals are received through
``anyio.open_signal_receiver`` in the main thread instead, and the first one
cancels the scope around ``main()``; ``main()`` then finishes its shutdown
and :func:`run_with_signals` raises :class:`Interrupted`. A second signal
means "now": stdio is flushed and the process leaves at once through
``os._exit(128 + signum)``, skipping whatever is still running.

On Windows only SIGINT is handled (there is no SIGTERM to receive there).
Outside the main thread signals cannot be received: ``main()`` just runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel

from .aio import LoopWaker
from .worker import DaemonWorker

__all__ = [
    "Interrupted",
    "handled_signals",
    "run_beside",
    "run_with_signals",
    "signal_name",
]

T = TypeVar("T")


class Interrupted(KeyboardInterrupt):
    """The run was cancelled by a signal; its shutdown has run.

    A ``KeyboardInterrupt`` so that a script's ``except KeyboardInterrupt``
    keeps working. ``signum`` is the signal, ``exit_code`` the conventional
    ``128 + signum`` (130 for SIGINT, 143 for SIGTERM); ``value`` is what
    ``main()`` returned if it finished anyway.
    """

    def __init__(self, signum: int, value: Any = None) -> None:
        super().__init__(f"interrupted by {signal_name(signum)}")
        self.signum = signum
        self.value = value

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """``SIGINT`` for 2; ``signal 99`` for a number that names none."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def handled_signals() -> tuple[signal.Signals, ...]:
    """The signals :func:`run_with_signals` turns into a clean cancellation here."""
    if sys.platform == "win32":
        return (signal.SIGINT,)
    return (signal.SIGINT, signal.SIGTERM)


class _Outcome(Generic[T]):
    def __init__(self) -> None:
        self.signals: list[int] = []
        self.value: T | None = None
        self.finished = False
        self.error: BaseException | None = None


def _exit_now(signum: int) -> None:
    """The second signal: leave at once, without the shutdown."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(128 + signum)


def run_with_signals(
    main: Callable[[], Awaitable[T]],
    *,
    backend: str = "asyncio",
    on_signal: Callable[[int], None] | None = None,
) -> T:
    """Run ``main()`` with ``anyio.run`` on ``backend``; return its value.

    The first SIGINT or SIGTERM (SIGINT only on Windows) cancels ``main()``'s
    scope; once ``main()`` has unwound (its shielded shutdown included),
    :class:`Interrupted` is raised. ``on_signal(signum)`` is called on the
    event loop at that first signal (the CLI prints a line there). A second
    signal flushes stdio and calls ``os._exit(128 + signum)``.

    Raises whatever ``main()`` raises other than the cancellation.
    """
    if threading.current_thread() is not threading.main_thread():
        return anyio.run(main, backend=backend)
    outcome: _Outcome[T] = _Outcome()

    async def watch(
        run_scope: anyio.CancelScope,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        async with _receive(handled_signals()) as signals:
            task_status.started()
            async for signum in signals:
                if outcome.signals:
                    _exit_now(int(signum))
                outcome.signals.append(int(signum))
                run_scope.cancel()
                if on_signal is not None:
                    on_signal(int(signum))

    async def runner() -> None:
        run_scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            await tg.start(watch, run_scope)
            try:
                with run_scope:
                    outcome.value = await main()
                    outcome.finished = True
            except BaseException as exc:  # re-raised below, unwrapped, outside the group
                outcome.error = exc
            finally:
                # The watcher stays up through main()'s shutdown, so a second
                # signal still means "now"; it ends only here.
                tg.cancel_scope.cancel()

    anyio.run(runner, backend=backend)
    if outcome.signals:
        raise Interrupted(outcome.signals[0], outcome.value) from outcome.error
    if outcome.error is not None:
        raise outcome.error
    if not outcome.finished:  # pragma: no cover - cancelled without a signal: not ours
        raise RuntimeError("run_with_signals: main() was cancelled without a signal")
    return outcome.value  # type: ignore[return-value]


def run_beside(
    main: Callable[[DaemonWorker], Awaitable[T]],
    *,
    backend: str = "asyncio",
    name: str = "evsys-step",
    enter: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> T:
    """Run ``main(worker)`` on an event loop in a background thread, while *this*
    thread serves ``worker``'s calls (a ``def`` step runs here); return its value.
    ``enter()``, when given, is entered in this thread around it all (the run's
    ``step_context``); what entering it raises is raised before anything starts.

    So a plain script keeps its thread: thread-local state set around the call
    (``torch.no_grad()``, ``torch.device``) applies inside the step, and it
    works where an event loop already runs in this thread. In the main thread
    the first SIGINT or SIGTERM cancels ``main``'s scope (its shutdown runs,
    the step in progress finishes), then :class:`Interrupted` is raised; a
    second flushes stdio and leaves at once with ``os._exit(128 + signum)``.

    Raises whatever ``main`` raises, unwrapped.
    """
    worker = DaemonWorker(name, start=False)
    outcome: _Outcome[T] = _Outcome()
    cancel: list[Callable[[], object]] = []  # the run scope's cancel, soon on the loop

    async def runner() -> None:
        scope = anyio.CancelScope()
        waker = LoopWaker()
        cancel.append(lambda: waker.soon(scope.cancel))
        if outcome.signals:  # a signal came before the loop was up
            scope.cancel()
        try:
            with scope:
                outcome.value = await main(worker)
                outcome.finished = True
        except BaseException as exc:  # re-raised in the caller's thread, unwrapped
            outcome.error = exc

    def loop_thread() -> None:
        try:
            anyio.run(runner, backend=backend)
        except BaseException as exc:  # pragma: no cover - anyio.run itself failed
            outcome.error = outcome.error or exc
        finally:
            worker.close()  # the caller's serve() returns

    def on_signal(signum: int, frame: object) -> None:
        if outcome.signals:
            _exit_now(signum)
        outcome.signals.append(signum)
        for fn in cancel:
            fn()

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in handled_signals()}
    thread = threading.Thread(target=loop_thread, name="evsys-loop", daemon=True)
    try:
        with contextlib.nullcontext() if enter is None else enter():
            thread.start()
            worker.serve()
            thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if outcome.signals:
        raise Interrupted(outcome.signals[0], outcome.value) from outcome.error
    if outcome.error is not None:
        raise outcome.error
    return outcome.value  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def _receive(signals: tuple[signal.Signals, ...]) -> AsyncIterator[AsyncIterator[int]]:
    """``anyio.open_signal_receiver``; where the event loop cannot receive
    signals (asyncio on Windows), a plain handler that wakes the loop through
    its native token instead."""
    try:
        receiver = anyio.open_signal_receiver(*signals)
        received = receiver.__enter__()
    except NotImplementedError:  # pragma: no cover - asyncio on Windows
        pass
    else:
        try:
            yield received
        finally:
            receiver.__exit__(None, None, None)
        return
    send, recv = anyio.create_memory_object_stream[int](16)  # pragma: no cover
    native: Any = anyio.lowlevel.current_token().native_token  # pragma: no cover

    def handler(signum: int, frame: object) -> None:  # pragma: no cover
        wake = getattr(native, "call_soon_threadsafe", None) or native.run_sync_soon
        wake(send.send_nowait, signum)

    previous = {s: signal.signal(s, handler) for s in signals}  # pragma: no cover
    try:  # pragma: no cover
        async with recv:
            yield recv
    finally:  # pragma: no cover
        for s, old in previous.items():
            signal.signal(s, old)
        send.close()
