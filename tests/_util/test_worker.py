"""DaemonWorker and Outcome (``_util/worker.py``): one dedicated daemon thread, calls one at a time.

What the module promises: every call runs in the same thread (thread-local
state stays put), a daemon started in a copy of its creator's contextvars,
never the event loop's — or, with ``start=False``, the thread that runs
``serve()``; calls run in submission order; what a call raises is re-raised to the awaiting task; cancelling a call
does not stop it (the next call starts after it, ``wait_idle`` waits for it);
``close`` never blocks and lets the thread end after what was submitted; a
result handed to a loop that has ended raises nothing in the thread.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from evsys_async._util.worker import DaemonWorker, Outcome

pytestmark = pytest.mark.anyio

WAIT = 10.0


def _ident() -> int:
    return threading.get_ident()


async def test_every_call_runs_in_one_named_daemon_thread_off_the_loop() -> None:
    worker = DaemonWorker("evsys-test-worker")
    local = threading.local()

    def remember(value: int) -> None:
        local.value = value

    def recall() -> Any:
        return getattr(local, "value", None)

    try:
        with anyio.fail_after(WAIT):
            first = await worker.call(_ident)
            await worker.call(remember, 42)
            assert await worker.call(recall) == 42  # thread-local state stays put
            assert await worker.call(_ident) == first != threading.get_ident()
            thread = await worker.call(threading.current_thread)
        assert thread.daemon and thread.name == "evsys-test-worker"
    finally:
        worker.close()


async def test_calls_run_in_submission_order() -> None:
    worker = DaemonWorker("evsys-test-order")
    order: list[int] = []
    try:
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(worker.call, order.append, i)
                    await wait_all_tasks_blocked()  # submitted before the next one starts
        assert order == list(range(20))
    finally:
        worker.close()


class _Stop(BaseException):
    """A BaseException that is neither a cancellation nor an interrupt."""


async def test_what_the_call_raised_is_raised_to_the_awaiting_task() -> None:
    worker = DaemonWorker("evsys-test-raise")

    def fails() -> None:
        raise ValueError("in the thread")

    def stops() -> None:
        raise _Stop("base exception")

    try:
        with anyio.fail_after(WAIT):
            with pytest.raises(ValueError, match="in the thread"):
                await worker.call(fails)
            with pytest.raises(_Stop):
                await worker.call(stops)
            assert await worker.call(lambda: "the thread lives on") == "the thread lives on"
    finally:
        worker.close()


async def test_a_cancelled_call_runs_on_and_the_next_call_starts_after_it() -> None:
    worker = DaemonWorker("evsys-test-cancel")
    entered, release = threading.Event(), threading.Event()
    log: list[str] = []

    def slow() -> str:
        entered.set()
        release.wait(WAIT)
        log.append("slow ended")
        return "dropped"

    try:
        with anyio.fail_after(WAIT):
            with anyio.move_on_after(WAIT) as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(worker.call, slow)
                    await anyio.to_thread.run_sync(entered.wait, WAIT)
                    scope.cancel()  # the awaiting task gives up; the thread cannot
            assert scope.cancelled_caught and log == []

            async def next_call() -> None:
                await worker.call(log.append, "next")

            async with anyio.create_task_group() as tg:
                tg.start_soon(next_call)
                await wait_all_tasks_blocked()
                assert log == []  # queued behind the call still running
                release.set()
                await worker.wait_idle()
            assert log == ["slow ended", "next"]
    finally:
        release.set()
        worker.close()


async def test_wait_idle_waits_for_the_call_still_running() -> None:
    worker = DaemonWorker("evsys-test-idle")
    entered, release = threading.Event(), threading.Event()
    done: list[str] = []

    def slow() -> None:
        entered.set()
        release.wait(WAIT)
        done.append("slow")

    try:
        with anyio.fail_after(WAIT):
            await worker.wait_idle()  # nothing submitted: returns at once
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(worker.call, slow)
                    await anyio.to_thread.run_sync(entered.wait, WAIT)
                    scope.cancel()
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.wait_idle)
                await wait_all_tasks_blocked()
                assert done == []
                release.set()
            assert done == ["slow"]
    finally:
        release.set()
        worker.close()


async def test_close_never_blocks_and_the_thread_ends_after_what_was_submitted() -> None:
    worker = DaemonWorker("evsys-test-close")
    release = threading.Event()
    ran: list[str] = []
    with anyio.fail_after(WAIT):
        thread = await worker.call(threading.current_thread)

        def last() -> None:
            release.wait(WAIT)
            ran.append("last")

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.call, last)
            await wait_all_tasks_blocked()
            worker.close()  # returns at once although a call is running
            assert thread.is_alive() and ran == []
            release.set()
        await anyio.to_thread.run_sync(thread.join, WAIT)
    assert not thread.is_alive() and ran == ["last"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_an_outcome_settled_after_its_loop_ended_raises_nothing(backend: str) -> None:
    async def make() -> Outcome:
        return Outcome.new()

    outcome = anyio.run(make, backend=backend)  # the loop that would await it is gone
    outcome.settle(lambda: 5)  # in a thread nobody waits for: must not raise
    assert outcome.done and outcome.value == 5 and outcome.error is None
    failing = anyio.run(make, backend=backend)
    failing.settle(_raise_key_error)
    assert failing.done and isinstance(failing.error, KeyError)


def _raise_key_error() -> None:
    raise KeyError("kept for the awaiting task")


_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("evsys_test_caller", default="")


async def test_the_thread_starts_with_a_copy_of_the_creators_contextvars() -> None:
    token = _CALLER.set("set before the worker was made")
    try:
        worker = DaemonWorker("evsys-test-context")
    finally:
        _CALLER.reset(token)
    _CALLER.set("set after")  # a copy, taken at creation: later changes stay here
    try:
        with anyio.fail_after(WAIT):
            assert await worker.call(_CALLER.get) == "set before the worker was made"
    finally:
        worker.close()


async def test_without_a_thread_of_its_own_the_thread_that_serves_runs_the_calls() -> None:
    worker = DaemonWorker("evsys-test-served", start=False)
    served: list[bool] = []

    def serve() -> None:
        served.append(worker.serve())

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        with anyio.fail_after(WAIT):
            assert await worker.call(_ident) == server.ident
            assert not worker.busy
    finally:
        worker.close()
    with anyio.fail_after(WAIT):
        await anyio.to_thread.run_sync(server.join, WAIT)
    assert served == [False]  # close() ends serve() with False


async def test_serve_until_returns_once_the_condition_holds_after_a_call_or_a_nudge() -> None:
    worker = DaemonWorker("evsys-test-until", start=False)
    answered = threading.Event()
    results: list[bool] = []

    def serve_until() -> None:
        results.append(worker.serve(until=answered.is_set))
        results.append(worker.serve(until=answered.is_set))  # true at once after a nudge

    server = threading.Thread(target=serve_until, daemon=True)
    server.start()
    try:
        with anyio.fail_after(WAIT):
            # the call makes the condition true: the first serve() returns right after it,
            # before it could take anything else from the queue
            await worker.call(answered.set)
            worker.nudge()  # no call: the second serve() looks at its condition again
            await anyio.to_thread.run_sync(server.join, WAIT)
        assert results == [True, True]
    finally:
        worker.close()


async def test_busy_while_the_latest_call_runs() -> None:
    worker = DaemonWorker("evsys-test-busy")
    entered, release = threading.Event(), threading.Event()

    def slow() -> None:
        entered.set()
        release.wait(WAIT)

    try:
        assert not worker.busy  # nothing submitted
        with anyio.fail_after(WAIT):
            outcome = worker.submit(slow)
            await anyio.to_thread.run_sync(entered.wait, WAIT)
            assert worker.busy
            release.set()
            await outcome.result()
        assert not worker.busy
    finally:
        release.set()
        worker.close()
