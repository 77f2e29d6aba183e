"""The async utilities (``_util/aio.py``): is_async_callable, LoopWaker, shielded,
absorb_native_cancel, undo_self_cancel, Deadline.

Each is checked on its own, on asyncio and trio where it applies to both; the
native-cancellation helpers are asyncio's alone (trio has no native cancel
that pierces a shield, and a trio task cannot cancel itself).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio import wait_all_tasks_blocked

from evsys_async._util.aio import (
    Deadline,
    LoopWaker,
    absorb_native_cancel,
    current_task_getter,
    is_async_callable,
    on_asyncio,
    shielded,
    undo_self_cancel,
)

WAIT = 10.0

# -- is_async_callable: a handler is async when it, its __call__, or the function in a
# functools.partial is a coroutine function ------------------------------------------


async def _async_fn(event: Any) -> None:
    pass


def _sync_fn(event: Any) -> None:
    pass


class _AsyncCallable:
    async def __call__(self, event: Any) -> None:
        pass


class _SyncCallable:
    def __call__(self, event: Any) -> None:
        pass


class _Methods:
    async def a(self, event: Any) -> None:
        pass

    def s(self, event: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (_async_fn, True),
        (_sync_fn, False),
        (functools.partial(_async_fn), True),
        (functools.partial(functools.partial(_async_fn)), True),
        (functools.partial(_sync_fn), False),
        (_AsyncCallable(), True),
        (_SyncCallable(), False),
        (functools.partial(_AsyncCallable()), True),
        (_Methods().a, True),
        (_Methods().s, False),
        (lambda event: None, False),
    ],
    ids=repr,
)
def test_sync_or_async_detection(handler: Any, expected: bool) -> None:
    assert is_async_callable(handler) is expected


# -- which backend ------------------------------------------------------------------


@pytest.mark.anyio
async def test_on_asyncio_and_the_task_getter_follow_the_running_backend(
    anyio_backend: str,
) -> None:
    with anyio.fail_after(WAIT):
        await anyio.lowlevel.checkpoint()
        assert on_asyncio() is (anyio_backend == "asyncio")
        getter = current_task_getter()
        if anyio_backend == "asyncio":
            import asyncio

            assert getter is asyncio.current_task and getter() is asyncio.current_task()
        else:
            assert getter() is None  # a trio task cannot cancel itself: nothing to undo


# -- LoopWaker ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_loop_waker_runs_the_callback_on_the_loop_from_another_thread() -> None:
    loop_thread = threading.get_ident()
    ran_in: list[int] = []
    done = anyio.Event()
    waker = LoopWaker()

    def on_loop() -> None:
        ran_in.append(threading.get_ident())
        done.set()  # allowed: it runs on the loop thread

    with anyio.fail_after(WAIT):
        assert await anyio.to_thread.run_sync(waker.soon, on_loop) is True
        await done.wait()
    assert ran_in == [loop_thread]


@pytest.mark.anyio
async def test_loop_waker_never_waits_for_the_loop() -> None:
    # Called on the loop thread itself, without yielding: a soon() that waited for
    # the loop to run the callback would never return.
    ran = anyio.Event()
    waker = LoopWaker()
    with anyio.fail_after(WAIT):
        assert waker.soon(ran.set) is True
        assert not ran.is_set()  # not run yet: soon() only asked
        await ran.wait()


@pytest.mark.anyio
async def test_loop_waker_burst_of_one_callback_on_trio_runs_once(anyio_backend: str) -> None:
    calls: list[int] = []
    waker = LoopWaker()

    def count() -> None:
        calls.append(1)

    with anyio.fail_after(WAIT):
        for _ in range(5):
            waker.soon(count)  # the same callable each time: one request on trio
        await wait_all_tasks_blocked()
        await anyio.lowlevel.checkpoint()
    assert len(calls) == (1 if anyio_backend == "trio" else 5)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_loop_waker_of_an_ended_loop_says_so_and_does_not_raise(backend: str) -> None:
    async def make() -> LoopWaker:
        return LoopWaker()

    waker = anyio.run(make, backend=backend)  # the loop has ended
    assert waker.soon(lambda: None) is False


# -- shielded -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_shielded_finishes_the_work_then_lets_the_cancellation_through() -> None:
    gate = anyio.Event()
    finished: list[str] = []
    got: list[int] = []
    after = False

    async def work() -> int:
        await gate.wait()
        finished.append("work")
        return 7

    async def cancel_then_open(scope: anyio.CancelScope) -> None:
        await wait_all_tasks_blocked()  # work() waits on the gate, shielded
        scope.cancel()
        await wait_all_tasks_blocked()
        assert finished == []  # the cancellation did not end the work
        gate.set()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:
                tg.start_soon(cancel_then_open, scope)
                got.append(await shielded(work()))
                await anyio.lowlevel.checkpoint()  # the caller's cancellation lands here
                after = True
    assert finished == ["work"] and got == [7]
    assert scope.cancelled_caught and not after


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_shielded_holds_a_native_asyncio_cancel_until_the_work_ends() -> None:
    import asyncio

    gate = anyio.Event()
    started = anyio.Event()
    finished: list[str] = []

    async def work() -> str:
        started.set()
        await gate.wait()
        finished.append("work")
        return "done"

    with anyio.fail_after(WAIT):
        task = asyncio.get_running_loop().create_task(shielded(work()))
        await started.wait()
        task.cancel()  # uvicorn's shutdown, a nested asyncio.timeout ...
        await wait_all_tasks_blocked()
        assert not task.done() and finished == []
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task  # re-raised once the work ended
    assert finished == ["work"]


@pytest.mark.anyio
async def test_shielded_returns_the_result_and_raises_the_error() -> None:
    async def ok() -> str:
        await anyio.lowlevel.checkpoint()
        return "fine"

    async def bad() -> None:
        await anyio.lowlevel.checkpoint()
        raise KeyError("inner")

    with anyio.fail_after(WAIT):
        assert await shielded(ok()) == "fine"
        with pytest.raises(KeyError, match="inner"):
            await shielded(bad())


# -- absorb_native_cancel and undo_self_cancel (asyncio) ------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_absorb_native_cancel_withdraws_it_while_the_deadline_lasts() -> None:
    import asyncio

    async def probe() -> list[Any]:
        task = asyncio.current_task()
        assert task is not None
        out: list[Any] = []
        task.cancel()
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError as exc:
            out.append(task.cancelling())
            out.append(absorb_native_cancel(exc, Deadline(60)))
            out.append(task.cancelling())  # withdrawn: anyio's own scopes keep working
            await asyncio.sleep(0)  # and no cancel is left armed
            out.append(absorb_native_cancel(exc, Deadline(0)))  # deadline passed: not held
            out.append(absorb_native_cancel(KeyError("x"), Deadline(60)))  # not a cancel
        return out

    with anyio.fail_after(WAIT):
        result = await asyncio.get_running_loop().create_task(probe())
    assert result == [1, True, 0, False, False]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_undo_self_cancel_withdraws_a_handlers_cancel_of_its_own_task() -> None:
    import asyncio

    async def handler_cancels_itself() -> str:
        task = asyncio.current_task()
        assert task is not None
        base = task.cancelling()
        with anyio.CancelScope() as scope:
            task.cancel()  # not landed yet: still armed
            await undo_self_cancel(task, base, scope)
            await asyncio.sleep(0)  # would raise CancelledError if it were still armed
            assert task.cancelling() == base
        return "went on"

    with anyio.fail_after(WAIT):
        assert await asyncio.get_running_loop().create_task(handler_cancels_itself()) == "went on"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_undo_self_cancel_lets_the_callers_own_cancellation_through() -> None:
    import asyncio

    seen: list[str] = []

    async def cancelled_by_its_scope() -> None:
        task = asyncio.current_task()
        assert task is not None
        base = task.cancelling()
        with anyio.CancelScope() as scope:
            task.cancel()  # the handler's own
            scope.cancel()  # and the caller's
            await undo_self_cancel(task, base, scope)
            try:
                await anyio.lowlevel.checkpoint()
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            seen.append("went on")

    with anyio.fail_after(WAIT):
        task = asyncio.get_running_loop().create_task(cancelled_by_its_scope())
        try:
            await task
        except asyncio.CancelledError:
            assert task.cancelled()
    assert seen == ["cancelled"]  # not withdrawn with the handler's own request


# -- Deadline -----------------------------------------------------------------------


def test_deadline_none_never_passes() -> None:
    d = Deadline(None)
    assert d.remaining() is None and d.left() == float("inf") and not d.passed


def test_deadline_counts_down_and_never_goes_negative() -> None:
    assert Deadline(0).passed and Deadline(0).remaining() == 0.0
    assert Deadline(-5).left() == 0.0 and Deadline(-5).remaining() == 0.0
    d = Deadline(3600)
    remaining = d.remaining()
    assert not d.passed and remaining is not None and 0 < remaining <= 3600
    assert 0 < d.left() <= 3600


@pytest.mark.anyio
async def test_one_deadline_bounds_several_waits() -> None:
    # Two waits under one deadline: the second gets only what the first left.
    deadline = Deadline(0.05)
    with anyio.fail_after(WAIT):
        with anyio.move_on_after(deadline.left()) as first:
            await anyio.sleep_forever()
        with anyio.move_on_after(deadline.left()) as second:
            await anyio.sleep_forever()
    assert first.cancelled_caught and second.cancelled_caught and deadline.passed
