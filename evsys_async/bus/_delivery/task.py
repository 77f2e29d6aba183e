"""TaskDelivery: an ``async def`` handler runs in a task of its own, on the event loop.

The task is shielded from the bus block's cancellation (it must drain first)
and ends only through the bus: :meth:`begin_close` after what it holds, or
:meth:`cancel` past the close deadline. Nothing the handler raises leaves the
task: an exception, a stray cancellation (one the bus did not make; on
asyncio a self-cancel is withdrawn with ``uncancel``), ``GeneratorExit`` or an
exception group is the handler's failure; ``KeyboardInterrupt`` and
``SystemExit`` are too, and also go to the engine as a request to stop.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.abc

from ..._util.aio import current_task_getter, undo_self_cancel
from ..._util.log import get_logger
from ...events import Envelope, Event
from ...policies import Entry
from .base import Delivery, Hook, current_delivery, only_failures

__all__ = ["TaskDelivery"]

T = TypeVar("T")
_log = get_logger()


class TaskDelivery(Delivery):
    """A subscriber whose handler is ``async def``."""

    is_async = True
    isolation = "task"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # a wake is a park/unpark round trip of the task (a few us, more than the
        # handler's call): 4x larger batches; events still wait at most batch_delay
        self.batch_size = self.engine.batch_size * 4
        self._wake_evt = self.engine.new_event()
        self._woken = False
        self._running = False
        self._closed = False
        # made before the task starts: a block that never yields may be left (and
        # the scope cancelled) before the task first runs
        self._scope = anyio.CancelScope(shield=True)
        self._current_task = current_task_getter()

    def start(self, task_group: anyio.abc.TaskGroup) -> None:
        task_group.start_soon(self._run, name=f"evsys-sub:{self.name}")

    @property
    def idle(self) -> bool:
        return not self._running

    def wake(self) -> None:
        if not self._woken:
            self._woken = True
            self._wake_evt.set()

    def begin_close(self) -> None:
        self.closing = True
        self.wake()

    @property
    def closed(self) -> bool:
        return self._closed

    def cancel(self) -> None:
        self._scope.cancel()

    def abandon(self) -> None:
        """Never stuck: a task past its timeout is cancelled, not abandoned."""

    async def call(self, fn: Callable[[], T]) -> T:
        return fn()  # on the loop, like the handler: nothing runs between batches here

    # -- the task ----------------------------------------------------------------

    async def _run(self) -> None:
        current_delivery.set(self)
        engine = self.engine
        with self._scope:
            try:
                if self.on_start is not None:
                    await self._call_hook(self.on_start, "on_start")
                while True:
                    await self._wait_for_wake()
                    self._wake_evt = engine.new_event()
                    self._woken = False
                    while len(self.buffer):
                        self._running = True
                        end = engine.walked
                        batch = self.take()
                        if self.disabled is None:
                            await self._handle(batch)
                        else:
                            self.drop_rest(batch, 0)
                        if self.on_batch_end is not None and self.disabled is None:
                            # a flush is part of handling: barriers wait for it (as for def)
                            await self._call_hook(
                                self.on_batch_end, "on_batch_end", quiet=only_failures(batch)
                            )
                        self.handled_upto = max(self.handled_upto, end)
                        self._running = False
                        engine.notify()
                        if not (
                            engine.hurry or len(self.buffer) >= self.batch_size or self.closing
                        ):
                            if len(self.buffer):  # what came meanwhile: due one delay from now
                                engine.arm(time.monotonic() + engine.batch_delay)
                            break
                    if self.closing and not len(self.buffer):
                        break
            finally:
                self._running = False
                if self.on_close is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(engine.close_timeout):
                        await self._call_hook(self.on_close, "on_close")
                self.tell_failures()
                self._closed = True
                engine.notify()

    async def _wait_for_wake(self) -> None:
        """Wait to be woken; a stray cancellation of this task (not the bus's) is ignored."""
        while True:
            try:
                await self._wake_evt.wait()
                return
            except anyio.get_cancelled_exc_class():
                if self._scope.cancel_called:
                    raise
                _log.warning(
                    "stray cancellation of a subscriber task ignored", subscriber=self.name
                )
                task = self._current_task()
                if task is not None:
                    await undo_self_cancel(task, 0, self._scope)

    async def _handle(self, batch: list[Entry]) -> None:
        started = time.perf_counter()
        if self.timeout is None and not self.envelopes:
            await self._handle_plain(batch)
        else:
            await self._handle_wrapped(batch)
        self.seconds += time.perf_counter() - started

    async def _handle_plain(self, batch: list[Entry]) -> None:
        """The everyday path: the event as it is, no timeout. Per event: the call, a
        check that it did not cancel its own task (asyncio), a count."""
        handler, scope = self.handler, self._scope
        task = self._current_task()  # None on trio: there a hook cannot cancel its own task
        base = task.cancelling() if task is not None else 0
        marks = self.on_batch_end is None  # without a flush, each event is done on return
        for seq, event in batch:
            try:
                await handler(event)
            except BaseException as exc:
                if await self._failure(batch, seq, event, exc, task, base):
                    break
            else:
                if task is not None and task.cancelling() != base and not scope.cancel_called:
                    # it cancelled its own task and returned: that cancel is not ours
                    if await self._failure(batch, seq, event, None, task, base):
                        break
                else:
                    self.delivered += 1
            if marks:
                self.handled_upto = seq + 1

    async def _handle_wrapped(self, batch: list[Entry]) -> None:
        """With envelopes, or a timeout per call (a call past it is cancelled)."""
        handler, timeout, envelopes = self.handler, self.timeout, self.envelopes
        bus_id, scope = self.engine.bus_id, self._scope
        task = self._current_task()
        base = task.cancelling() if task is not None else 0
        marks = self.on_batch_end is None
        for seq, event in batch:
            arg = Envelope(bus_id, seq, event) if envelopes else event
            try:
                if timeout is None:
                    await handler(arg)
                else:
                    with anyio.fail_after(timeout):
                        await handler(arg)
            except BaseException as exc:
                if await self._failure(batch, seq, event, exc, task, base):
                    break
            else:
                if task is not None and task.cancelling() != base and not scope.cancel_called:
                    if await self._failure(batch, seq, event, None, task, base):
                        break
                else:
                    self.delivered += 1
            if marks:
                self.handled_upto = seq + 1

    async def _failure(
        self,
        batch: list[Entry],
        seq: int,
        event: Event,
        exc: BaseException | None,
        task: Any,
        base: int,
    ) -> bool:
        """Event ``seq``'s call failed (raised ``exc``; ``None``: it cancelled its own task
        and returned). Counted; a self-cancel is withdrawn; the bus's own cancellation
        propagates. True if that disabled the subscriber (the rest is dropped)."""
        if exc is None:
            self.count_failure(event, _self_cancel_error())
        elif isinstance(exc, Exception):
            self.count_failure(event, exc)
            task = None  # nothing to withdraw
        else:
            self._base_failure(event, exc, "")
        if task is not None:
            await undo_self_cancel(task, base, self._scope)
        if self.disabled is None:
            return False
        self.drop_after(batch, seq)
        return True

    async def _call_hook(self, hook: Hook, slot: str, *, quiet: bool = False) -> None:
        scope = self._scope
        task = self._current_task()
        base = task.cancelling() if task is not None else 0
        try:
            with anyio.fail_after(math.inf if self.timeout is None else self.timeout):
                result = hook()
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            self.count_failure(None, exc, slot, quiet=quiet)
        except BaseException as exc:
            self._base_failure(None, exc, slot)
            if task is not None:
                await undo_self_cancel(task, base, scope)
        else:
            if task is not None and task.cancelling() != base and not scope.cancel_called:
                self.count_failure(None, _self_cancel_error(), slot, quiet=quiet)
                await undo_self_cancel(task, base, scope)

    def _base_failure(self, event: Event | None, exc: BaseException, slot: str) -> None:
        """A ``BaseException`` from the handler or a hook. The bus's own cancellation of
        this task propagates; anything else is the handler's failure, and
        ``KeyboardInterrupt``/``SystemExit`` also ask to stop."""
        if self._scope.cancel_called and isinstance(exc, anyio.get_cancelled_exc_class()):
            raise exc
        self.count_failure(event, exc, slot)
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            self.engine.interrupt(self, exc)


def _self_cancel_error() -> BaseException:
    import asyncio

    return asyncio.CancelledError("the handler cancelled its own task")
