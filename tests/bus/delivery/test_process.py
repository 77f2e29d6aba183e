"""ProcessDelivery (``bus/_delivery/process.py``, ``spawn.py``, ``child.py``): a handler in
a child process.

Real child processes (forkserver here). What a child did comes back through files it
writes; every wait is bounded; no clock decides a result.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

import anyio
import pytest

import evsys_async as ev
from evsys_async.errors import CallbackProcessError, ChildTraceback
from evsys_async.events import CallbackFailed, StepEnded
from tests.process_helpers import Asks, AsyncRecorder, Recorder, Talker, fails, notes, whereami

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # handlers in child processes

WAIT = 60


def step(i: int) -> StepEnded:
    return StepEnded(step=i, num_steps=100)


class Failures:
    """An in-process ``async def`` sibling that keeps every ``CallbackFailed``."""

    def __init__(self) -> None:
        self.items: list[CallbackFailed] = []

    async def __call__(self, event: CallbackFailed) -> None:
        self.items.append(event)


def subscribe_recorder(bus: ev.EventBus, recorder: Recorder, **kwargs: object) -> ev.Subscription:
    return bus.subscribe(
        recorder,
        events=(StepEnded,),
        isolation="process",
        on_start=recorder.start,
        on_batch_end=recorder.batch_end,
        on_close=recorder.close,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("kind", [Recorder, AsyncRecorder])
async def test_a_handler_and_its_hooks_run_in_a_child_in_order(
    kind: type[Recorder], tmp_path: Path
) -> None:
    path = tmp_path / "notes.jsonl"
    n = 300
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=WAIT) as bus:
            sub = subscribe_recorder(bus, kind(path), envelopes=True)
            assert sub.isolation == "process"
            seqs = [bus.publish(step(i)) for i in range(n)]
            assert (await bus.drain(WAIT)).ok
            st = sub.stats()
            assert await sub.aclose(WAIT)
    got = notes(path)
    assert {g["pid"] for g in got} != {os.getpid()} and len({g["pid"] for g in got}) == 1
    kinds = [g["kind"] for g in got]
    assert kinds[0] == "on_start" and kinds[-1] == "on_close"
    events = [g for g in got if g["kind"] == "event"]
    assert [g["step"] for g in events] == list(range(n))
    assert [g["seq"] for g in events] == seqs  # envelopes carry the parent's numbers
    assert kinds.count("on_batch_end") >= 1 and kinds[-2] == "on_batch_end"
    assert (st.delivered, st.failed, st.dropped, st.pending) == (n, 0, 0, 0)
    assert st.startup_seconds > 0 and st.disabled is None


async def test_a_handler_that_cannot_be_pickled_is_refused_at_subscribe() -> None:
    lock = threading.Lock()

    def local(event: StepEnded) -> None:
        assert not lock.locked()

    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            with pytest.raises(TypeError) as raised:
                bus.subscribe(local, name="mine", isolation="process")
            assert not bus.stats()  # nothing was subscribed
            bus.subscribe(Recorder("unused"), name="mine", isolation="thread")  # name free
    text = str(raised.value)
    assert "'mine'" in text and "must pickle" in text and "module level" in text


@pytest.mark.parametrize(
    ("isolation", "sync", "error"),
    [("nowhere", None, ValueError), ("task", None, TypeError), ("thread", False, TypeError)],
)
async def test_an_isolation_that_cannot_be_is_refused(
    isolation: str, sync: bool | None, error: type[Exception]
) -> None:
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            with pytest.raises(error, match="isolation"):
                bus.subscribe(Recorder("unused"), isolation=isolation, sync=sync)  # type: ignore[arg-type]


async def test_call_runs_in_the_child_and_brings_back_result_or_error(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=WAIT) as bus:
            sub = bus.subscribe(Recorder(tmp_path / "n"), isolation="process")
            pid = await sub.call(whereami)
            with pytest.raises(LookupError, match="in the child") as raised:
                await sub.call(fails)
            with pytest.raises(TypeError, match="must pickle"):
                await sub.call(lambda: 1)
    assert pid != os.getpid()
    cause = raised.value.__cause__
    assert isinstance(cause, ChildTraceback) and "in fails" in cause.text
    assert "_child.py" not in cause.text  # the callback's frames, not the runtime's


async def test_a_raising_child_reports_its_traceback_and_goes_on(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    failures = Failures()
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=WAIT) as bus:
            bus.subscribe(failures, events=(CallbackFailed,))
            sub = subscribe_recorder(bus, Recorder(tmp_path / "n", "raise", at=4), name="boom")
            for i in range(10):
                bus.publish(step(i))
            assert (await bus.drain(WAIT)).ok
            st = sub.stats()
    assert (st.delivered, st.failed, st.dropped, st.pending) == (9, 1, 0, 0)
    [failed] = failures.items
    assert failed.subscriber == "boom" and failed.error == "ValueError: hostile"
    assert "process_helpers.py" in failed.traceback and "raise ValueError" in failed.traceback
    [record] = [r for r in warnings_log.records if "callback=boom" in r.getMessage()]
    assert record.exc_info is not None and record.exc_info[0] is ValueError
    assert isinstance(record.exc_info[1].__cause__, ChildTraceback)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("exit", "process died: exit code 3"),
        ("sigkill", "process died: SIGKILL"),
        ("segfault", "process died: SIGSEGV"),
        ("hang", "killed after hook_timeout (0.2s)"),
        ("spin", "killed after hook_timeout (0.2s)"),
    ],
)
async def test_a_child_that_dies_is_reported_and_every_event_counted(
    fault: str, reason: str, tmp_path: Path
) -> None:
    path = tmp_path / "n"
    failures = Failures()
    n, at = 40, 5
    timeout = 0.2 if reason.startswith("killed") else None
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=WAIT) as bus:
            bus.subscribe(failures, events=(CallbackFailed,))
            sub = subscribe_recorder(
                bus, Recorder(path, fault, at=at), name="dies", timeout=timeout
            )
            for i in range(at + 1):
                bus.publish(step(i))
            await bus.drain(WAIT)  # it dies on the last one
            assert sub.stuck
            for i in range(at + 1, n):
                bus.publish(step(i))  # dropped: a dead child is not restarted
            assert (await bus.drain(WAIT)).ok  # not waited for
            st = sub.stats()
            await sub.aclose(WAIT)
            final = sub.stats()
    assert [g["step"] for g in notes(path) if g["kind"] == "event"] == list(range(at + 1))
    assert (st.delivered, st.failed) == (at, 1)
    assert st.dropped + st.pending == n - at - 1
    assert (final.delivered, final.failed, final.dropped, final.pending) == (at, 1, n - at - 1, 0)
    assert final.disabled == reason
    assert [(f.subscriber, f.event_type) for f in failures.items] == [("dies", "StepEnded")]
    assert reason.split(" (")[0] in failures.items[0].error or "timeout" in failures.items[0].error


async def test_a_child_dying_in_its_flush_counts_its_events_delivered(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=WAIT) as bus:
            rec = Recorder(tmp_path / "n")
            sub = bus.subscribe(
                rec, events=(StepEnded,), isolation="process", on_batch_end=os.abort
            )
            for i in range(5):
                bus.publish(step(i))
            await bus.drain(WAIT)
            st = sub.stats()
    assert (st.delivered, st.failed, st.dropped, st.hook_failures) == (5, 0, 0, 1)
    assert st.disabled == "process died: SIGABRT"


async def test_a_child_still_busy_at_the_close_deadline_is_killed(tmp_path: Path) -> None:
    path = tmp_path / "n"
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=WAIT) as bus:
            sub = subscribe_recorder(bus, Recorder(path, "hang", at=2))
            for i in range(10):
                bus.publish(step(i))
            assert not (await bus.drain(0.5)).ok
            assert not await sub.aclose(0.5)  # the deadline passes: it is killed
            st = sub.stats()
    assert sub.stuck and st.disabled is not None and "close deadline" in st.disabled
    assert (st.delivered, st.failed, st.dropped, st.pending) == (2, 0, 8, 0)
    assert "on_close" not in [g["kind"] for g in notes(path)]


async def test_logs_and_output_of_the_child_reach_the_parent(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.WARNING, logger="evsys_async")
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=WAIT) as bus:
            bus.subscribe(Talker(), events=(StepEnded,), isolation="process")
            for i in range(3):
                bus.publish(step(i))
            assert (await bus.drain(WAIT)).ok
    records = [r for r in caplog.records if r.name == "evsys_async.test_child"]
    assert [r.getMessage() for r in records] == [
        "child says 0",
        "child says 1",
        "with a traceback",
        "child says 2",
    ]
    assert records[2].exc_text is not None and "KeyError: 'logged'" in records[2].exc_text
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("out")] == [
        "out 0",
        "out 1",
        "out 2",
    ]
    assert [line for line in err.splitlines() if line.startswith("err")] == [
        "err 0",
        "err 1",
        "err 2",
    ]


async def test_a_program_that_cannot_load_in_the_child_is_reported(tmp_path: Path) -> None:
    # pickles here, fails to unpickle there: a partial over a function the child's
    # import of this module cannot find (it exists only in this process)
    failures = Failures()
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=WAIT) as bus:
            bus.subscribe(failures, events=(CallbackFailed,))
            sub = bus.subscribe(
                functools.partial(Unloadable(), 1), events=(StepEnded,), isolation="process"
            )
            for i in range(3):
                bus.publish(step(i))
            assert (await bus.drain(WAIT)).ok  # not waited for
            await sub.aclose(WAIT)
            st = sub.stats()
    assert (st.delivered, st.failed, st.dropped, st.pending, st.hook_failures) == (0, 0, 3, 0, 1)
    assert st.disabled is not None and st.disabled.startswith("process failed to start")
    assert isinstance(sub.last_error, CallbackProcessError)
    assert [f.hook for f in failures.items] == ["on_start"]


class Unloadable:
    """Pickles here; in the child, ``__setstate__`` raises."""

    def __call__(self, n: int, event: StepEnded) -> None: ...

    def __getstate__(self) -> dict[str, int]:
        return {"x": 1}

    def __setstate__(self, state: dict[str, int]) -> None:
        raise RuntimeError("cannot load here")


async def test_request_parent_reaches_on_request_before_the_batch_counts_done() -> None:
    got: list[bytes] = []
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=WAIT) as bus:
            bus.subscribe(Asks(), events=(StepEnded,), isolation="process", on_request=got.append)
            for i in range(3):
                bus.publish(step(i))
            report = await bus.publish_and_wait(step(3), timeout=WAIT)
            assert report.ok
            assert got == [b"step 0", b"step 1", b"step 2", b"step 3"]  # in order, all in
            assert not ev.bus.in_subscriber_process()


def test_request_parent_outside_a_subscriber_process_says_where_it_works() -> None:
    with pytest.raises(RuntimeError, match="only in a subscriber's own process"):
        ev.bus.request_parent(b"x")
    with pytest.raises(TypeError, match="sends bytes"):
        ev.bus.request_parent("text")  # type: ignore[arg-type]
