"""The fault matrix: nothing a callback does ends training, leaks into a sibling,
or goes uncounted.

Each case runs a short loop (60 steps, an evaluator every 5, a checkpoint every
10) with one hostile callback and lossless siblings of each kind (``def``,
``async def``, the CSV and local loggers). For every hook x kind x fault, on
asyncio and trio (for a callback in its own process, a reduced set:
``PROCESS_FAULTS``):

* ``run()`` returns artifacts, or raises exactly the documented exception
  (``KeyboardInterrupt``/``SystemExit`` from an ``async def`` hook) after a
  shutdown that delivered ``TrainEnded`` to every sibling;
* ``steps_completed`` is right;
* every sibling saw every event once, in publish order, unmodified;
* per callback, delivered + failed + dropped + pending equals the events it
  matched, counted by an independent sibling;
* every file the loggers wrote parses.
"""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import evsys_async as ev
from evsys_async.callbacks.csv_metrics import CsvMetricsCallback
from evsys_async.callbacks.local_logger import LocalLoggerCallback
from evsys_async.events import (
    CallbackFailed,
    CheckpointSaved,
    EvalEnded,
    Event,
    StepEnded,
    TrainEnded,
    TrainStarted,
)

pytestmark = pytest.mark.anyio

STEPS = 60
FIRE_AT = 3  # the (1-based) call of the hook at which a one-shot fault fires
WAIT = 30

#: the hook under test -> the event type it handles (None: a lifecycle hook)
HOOKS: dict[str, type[Event] | None] = {
    "on_train_start": TrainStarted,
    "on_step_end": StepEnded,
    "on_eval": EvalEnded,
    "on_checkpoint": CheckpointSaved,
    "on_train_end": TrainEnded,
    "setup": None,
    "teardown": None,
    "flush": None,
}
FAULTS = [
    "raise",
    "system_exit",
    "keyboard_interrupt",
    "generator_exit",
    "exception_group",
    "cancelled",
    "self_cancel",
    "self_cancel_return",
    "hang",
    "mutate",
    "request_stop",
    "publish",
]
ARGS = {
    "on_train_start": ("state",),
    "on_step_end": ("state", "step_idx", "batch", "metrics"),
    "on_eval": ("state", "step_idx", "eval_name", "metrics"),
    "on_checkpoint": ("state", "row"),
    "on_train_end": ("state", "artifacts"),
    "setup": ("state",),
    "teardown": ("state",),
    "flush": (),
}


class Ping(Event, kw_only=True):
    """What a hostile callback publishes from its hook."""

    n: int


def metrics_of(step_idx: int) -> dict[str, float]:
    return {"loss": 1.0 / (step_idx + 1), "lr": 0.1}


async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    return metrics_of(step_idx)


class Acc:
    name, run_every = "val", 5

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"acc": step_idx / 100}


def checkpoint(state: ev.LoopState, name: str) -> dict[str, Any]:
    return {"path": f"ckpt-{name}"}


class Fault:
    """What the hostile hook does; ``release`` frees a hung ``def`` hook at the end."""

    def __init__(self, fault: str, kind: str, backend: str) -> None:
        self.fault, self.kind, self.backend = fault, kind, backend
        self.calls = 0
        self.release = threading.Event()
        self.captured_cancel: BaseException | None = None

    def fires(self) -> bool:
        self.calls += 1
        if self.fault in ("raise", "mutate"):
            return True  # every call
        return self.calls == (1 if self.hook_once else FIRE_AT)

    #: set for hooks that may be called only once a run (setup, teardown, start, end,
    #: flush: batches are as large as they come): fire at the first call
    hook_once = False
    #: the run's state, as the callback last saw it (flush gets none)
    state: ev.LoopState | None = None

    def sync(self, values: dict[str, Any]) -> None:
        if self.fires():
            self.act(values)

    def act(self, values: dict[str, Any]) -> None:
        values.setdefault("state", self.state)
        f = self.fault
        if f == "raise":
            raise ValueError("hostile")
        if f == "system_exit":
            raise SystemExit(3)
        if f == "keyboard_interrupt":
            raise KeyboardInterrupt
        if f == "generator_exit":
            raise GeneratorExit
        if f == "exception_group":
            raise BaseExceptionGroup("hostile", [KeyboardInterrupt(), ValueError("x")])
        if f == "cancelled":
            raise self._cancel_exc()
        if f == "hang":
            self.release.wait(WAIT)
        elif f == "mutate":
            self._mutate(values)
        elif f == "request_stop":
            values["state"].request_stop("hostile stop")
        elif f == "publish":
            values["state"].publish(Ping(n=self.calls))

    async def async_(self, values: dict[str, Any]) -> None:
        if not self.fires():
            return
        f = self.fault
        if f == "hang":
            await anyio.sleep_forever()
        elif f == "self_cancel":
            import asyncio

            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await anyio.lowlevel.checkpoint()  # the cancel lands here, in the hook
        elif f == "self_cancel_return":
            import asyncio

            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # and return with it pending: it would land in the bus
        elif f == "cancelled" and self.backend == "trio":
            raise self._cancel_exc()
        else:
            self.act(values)

    def _cancel_exc(self) -> BaseException:
        if self.backend == "trio":
            assert self.captured_cancel is not None
            return self.captured_cancel
        import asyncio

        return asyncio.CancelledError()

    @staticmethod
    def _mutate(values: dict[str, Any]) -> None:
        for key in ("metrics", "row"):
            target = values.get(key)
            if isinstance(target, dict):
                target["loss"] = -1.0
                target["injected"] = 1.0
        artifacts = values.get("artifacts")
        if artifacts is not None:
            raise TypeError("nothing to mutate in artifacts")  # a failure all the same
        if not any(isinstance(values.get(k), dict) for k in ("metrics", "row")):
            raise TypeError("nothing to mutate here")  # a failure all the same


def hostile_class(hook: str, kind: str, fault: Fault) -> type[ev.Callback]:
    """A callback class that overrides ``hook`` (and on_step_end, so it has events)."""
    names = ARGS[hook]
    ns: dict[str, Any] = {
        "hook_timeout": 0.05 if fault.fault == "hang" else None,
        # the loop waits for it after each event, so where the run stops is exact
        "controls_loop": fault.fault in ("request_stop", "system_exit", "keyboard_interrupt"),
    }
    fault.hook_once = hook in ("setup", "teardown", "on_train_start", "on_train_end", "flush")

    def make(hook_names: tuple[str, ...], act: bool) -> Callable[..., Any]:
        if kind == "def":

            def method(self: Any, *args: Any) -> None:
                values = dict(zip(hook_names, args, strict=True))
                fault.state = values.get("state", fault.state)
                if act:
                    fault.sync(values)

        else:

            async def method(self: Any, *args: Any) -> None:  # type: ignore[misc]
                values = dict(zip(hook_names, args, strict=True))
                fault.state = values.get("state", fault.state)
                if act:
                    await fault.async_(values)

        return method

    ns[hook] = make(names, True)
    if hook != "on_step_end":
        ns["on_step_end"] = make(ARGS["on_step_end"], False)
    return type(f"Hostile_{hook}_{kind}", (ev.Callback,), ns)


class DefSibling(ev.Callback):
    def __init__(self) -> None:
        self.envelopes: list[ev.Envelope] = []

    def on_envelope(self, state: ev.LoopState, envelope: ev.Envelope) -> None:
        self.envelopes.append(envelope)


class AsyncSibling(ev.Callback):
    def __init__(self) -> None:
        self.envelopes: list[ev.Envelope] = []

    async def on_envelope(self, state: ev.LoopState, envelope: ev.Envelope) -> None:
        self.envelopes.append(envelope)


def applies(hook: str, kind: str, fault: str, backend: str) -> bool:
    if fault.startswith("self_cancel"):
        return kind == "async" and backend == "asyncio"
    if fault == "request_stop":
        return hook not in ("teardown", "on_train_end")  # nothing left to stop there
    return not (fault == "publish" and hook == "teardown")  # the run's bus is closing


CASES = [
    pytest.param(backend, hook, kind, fault, id=f"{backend}-{hook}-{kind}-{fault}")
    for backend in ("asyncio", "trio")
    for hook in HOOKS
    for kind in ("def", "async")
    for fault in FAULTS
    if applies(hook, kind, fault, backend)
]


async def capture_cancelled() -> BaseException:
    import trio

    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("not cancelled")


@pytest.mark.parametrize(("anyio_backend", "hook", "kind", "fault_name"), CASES)
async def test_fault_matrix(
    hook: str, kind: str, fault_name: str, anyio_backend: str, tmp_path: Path
) -> None:
    fault = Fault(fault_name, kind, anyio_backend)
    if fault_name == "cancelled" and anyio_backend == "trio":
        fault.captured_cancel = await capture_cancelled()
    hostile = hostile_class(hook, kind, fault)()
    interrupts = {"system_exit": SystemExit, "keyboard_interrupt": KeyboardInterrupt}
    expect_raise = interrupts.get(fault_name) if kind == "async" else None
    try:
        with anyio.fail_after(WAIT):
            await run_case(hostile, hook, kind, fault_name, tmp_path, expect_raise, Ping)
    finally:
        fault.release.set()


#: the reduced set run with the hostile callback in its own process (a process per
#: case costs a start): every hook with a raise and a SIGKILL, and the other ways to
#: fail where they differ (a hang is a kill at hook_timeout, requests cross back)
PROCESS_FAULTS = {
    "raise": tuple(HOOKS),
    "sigkill": tuple(HOOKS),
    "exit": ("on_step_end", "setup"),
    "hang": ("on_step_end", "flush", "teardown"),
    "request_stop": ("on_step_end", "on_eval", "flush"),
    "publish": ("on_checkpoint", "setup"),
}
PROCESS_CASES = [
    pytest.param(backend, hook, fault, id=f"{backend}-{hook}-process-{fault}")
    for backend in ("asyncio", "trio")
    for fault, hooks in PROCESS_FAULTS.items()
    for hook in hooks
]


@pytest.mark.slow
@pytest.mark.parametrize(("anyio_backend", "hook", "fault_name"), PROCESS_CASES)
async def test_fault_matrix_in_a_process(hook: str, fault_name: str, tmp_path: Path) -> None:
    from tests.process_helpers import HOSTILE, ChildPing

    once = hook in ("setup", "teardown", "on_train_start", "on_train_end", "flush")
    hostile = HOSTILE[hook](fault_name, 1 if once else FIRE_AT)
    with anyio.fail_after(WAIT):
        await run_case(hostile, hook, "process", fault_name, tmp_path, None, ChildPing)


async def run_case(
    hostile: ev.Callback,
    hook: str,
    kind: str,
    fault_name: str,
    tmp_path: Path,
    expect_raise: type[BaseException] | None,
    ping: type[Event],
) -> None:
    """Run the matrix's loop with ``hostile`` and check every promise (module docstring)."""
    sib_def, sib_async = DefSibling(), AsyncSibling()
    loop = ev.TrainingLoop(
        step,
        num_steps=STEPS,
        output_dir=tmp_path,
        run_key="matrix",
        evaluators=[Acc()],
        callbacks=[
            sib_def,
            hostile,
            sib_async,
            CsvMetricsCallback("metrics.csv"),
            LocalLoggerCallback(print_every=0),
        ],
        save_every=10,
        checkpoint=checkpoint,
        drain_timeout=10,
        control_timeout=5,
    )
    artifacts: ev.LoopArtifacts | None = None
    if expect_raise is not None:
        with pytest.raises(expect_raise) as raised:
            await loop.run()
        assert type(raised.value) is expect_raise  # unwrapped, no group
        artifacts = loop.artifacts
    else:
        artifacts = await loop.run()
    assert isinstance(artifacts, ev.LoopArtifacts)

    # -- the run ended as it should ------------------------------------------------
    done = artifacts.steps_completed
    if expect_raise is not None:
        if hook in ("on_train_end", "teardown"):
            assert artifacts.status == "completed" and done == STEPS
        else:
            assert artifacts.status == "cancelled" and done < STEPS
    elif fault_name == "request_stop":
        assert artifacts.status == "stopped" and artifacts.stop_reason == "hostile stop"
        assert 1 <= done < STEPS
    else:
        assert artifacts.status == "completed" and done == STEPS

    # -- every sibling saw every event once, in order, unmodified -------------------
    for sibling in (sib_def, sib_async):
        seqs = [e.seq for e in sibling.envelopes]
        assert seqs == sorted(set(seqs)), "duplicated or out of order"
        events = [e.event for e in sibling.envelopes]
        steps = [e for e in events if isinstance(e, StepEnded)]
        assert [e.step for e in steps] == list(range(done))
        for e in steps:
            assert dict(e.metrics) == metrics_of(e.step)
        for e in events:
            if isinstance(e, CheckpointSaved):
                assert "injected" not in e.row
        ends = [e for e in events if isinstance(e, TrainEnded)]
        assert len(ends) == 1 and ends[0].status == artifacts.status
        loop_events = [e for e in events if not isinstance(e, CallbackFailed | ping)]
        assert isinstance(loop_events[0], TrainStarted)
        if fault_name == "publish" and hook != "setup":
            assert any(isinstance(e, ping) for e in events)

    # -- every event counted once -----------------------------------------------------
    report = artifacts.callback_report
    assert report is not None
    seen = [e.event for e in sib_async.envelopes]
    wanted = tuple(t for t in (StepEnded, HOOKS[hook]) if t is not None)
    expected = sum(1 for e in seen if isinstance(e, wanted))
    h = report[type(hostile).__name__]
    assert h.delivered + h.failed + h.dropped + h.pending == expected, h
    for sibling in (sib_def, sib_async):
        s = report[type(sibling).__name__]
        assert (s.delivered, s.failed, s.dropped, s.pending) == (len(sibling.envelopes), 0, 0, 0)
    if fault_name == "hang" and kind != "async" and hook not in ("teardown",):
        assert h.stuck or h.failed >= 1
    if fault_name in ("raise", "mutate") and HOOKS[hook] is not None:
        assert h.failed >= 1
    if fault_name in ("sigkill", "exit") and hook != "teardown":
        assert h.stuck and h.disabled is not None and h.disabled.startswith("process died")

    # -- the loggers' files parse ---------------------------------------------------
    run_dir = artifacts.run_dir
    text = (run_dir / "metrics.csv").read_text(encoding="utf-8")
    rows = list(csv.reader(text.splitlines()))
    header, body = rows[0], rows[1:]
    assert all(len(r) == len(header) for r in body)
    assert "injected" not in header
    train_rows = [r for r in body if r[header.index("loss")]]
    assert [int(r[0]) for r in train_rows] == list(range(done))
    for name in ("metrics.jsonl", "events.jsonl"):
        for line in (run_dir / name).read_text(encoding="utf-8").splitlines():
            json.loads(line)


# -- the same promises on a bare bus ---------------------------------------------------


class Counter:
    """An ``async def`` sibling that counts what it gets."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    async def __call__(self, event: StepEnded) -> None:
        self.steps.append(event.step)


def step_event(i: int) -> StepEnded:
    return StepEnded(step=i, num_steps=1000)


@pytest.mark.parametrize("how", ["raise_cancelled", "self_cancel", "self_cancel_return"])
async def test_a_stray_cancellation_is_the_handlers_failure_not_the_buses(
    how: str, anyio_backend: str
) -> None:
    if anyio_backend == "trio" and how != "raise_cancelled":
        pytest.skip("a trio task cannot cancel itself")
    captured = await capture_cancelled() if anyio_backend == "trio" else None

    async def hostile(event: StepEnded) -> None:
        if event.step != 10:
            return
        if how == "raise_cancelled":
            import asyncio

            raise captured if captured is not None else asyncio.CancelledError()
        import asyncio

        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        if how == "self_cancel":
            await anyio.lowlevel.checkpoint()

    sibling = Counter()
    published = 0
    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            bus.subscribe(hostile, events=(StepEnded,))
            bus.subscribe(sibling, events=(StepEnded,))
            for i in range(1000):
                bus.publish(step_event(i))
                published += 1
                if i % 50 == 0:
                    await anyio.lowlevel.checkpoint()  # let the handlers run meanwhile
            assert (await bus.drain()).ok
            st = bus.stats()["hostile"]
    assert published == 1000 and sibling.steps == list(range(1000))
    assert (st.delivered, st.failed, st.dropped, st.pending) == (999, 1, 0, 0)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_an_interrupt_in_an_async_handler_leaves_the_block_after_the_drain(
    exc_type: type[BaseException],
) -> None:
    sibling = Counter()

    async def hostile(event: StepEnded) -> None:
        if event.step == 3:
            raise exc_type()

    reached_after = False

    async def block() -> None:
        nonlocal reached_after
        async with ev.EventBus(close_timeout=5) as bus:
            bus.subscribe(hostile, events=(StepEnded,))
            bus.subscribe(sibling, events=(StepEnded,))
            for i in range(10):
                bus.publish(step_event(i))
            await bus.drain()
            await anyio.sleep_forever()  # cancelled by the interrupt
            reached_after = True

    with anyio.fail_after(WAIT), pytest.raises(exc_type) as raised:
        await block()
    assert type(raised.value) is exc_type  # unwrapped: not an exception group
    assert not reached_after
    assert sibling.steps == list(range(10))  # the drain ran before it left


async def test_an_interrupt_in_one_run_on_a_shared_bus_leaves_the_other_running(
    tmp_path: Path,
) -> None:
    class Interrupts(ev.Callback):
        controls_loop = True

        async def on_step_end(self, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            if i == 2:
                raise KeyboardInterrupt

    other_going = anyio.Event()
    finish = anyio.Event()

    async def slow_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 1:
            other_going.set()
            await finish.wait()
        return {"loss": 1.0}

    async with ev.EventBus(close_timeout=5) as bus:
        survivor = AsyncSibling()
        b_loop = ev.TrainingLoop(
            slow_step, num_steps=5, output_dir=tmp_path, run_key="b", bus=bus,
            callbacks=[survivor],
        )  # fmt: skip
        a_loop = ev.TrainingLoop(
            step, num_steps=50, output_dir=tmp_path, run_key="a", bus=bus,
            callbacks=[Interrupts()],
        )  # fmt: skip
        b_result: list[ev.LoopArtifacts] = []

        async def run_b() -> None:
            b_result.append(await b_loop.run())

        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_b)
                await other_going.wait()
                with pytest.raises(KeyboardInterrupt):
                    await a_loop.run()
                assert a_loop.artifacts is not None
                assert a_loop.artifacts.status == "cancelled"
                assert a_loop.artifacts.steps_completed == 3
                finish.set()
    [b] = b_result
    assert b.status == "completed" and b.steps_completed == 5
    steps = [e.event.step for e in survivor.envelopes if isinstance(e.event, StepEnded)]
    assert steps == list(range(5))  # run b never saw run a's events


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt, GeneratorExit])
async def test_a_base_exception_in_a_def_handler_is_its_failure(
    exc_type: type[BaseException], warnings_log: pytest.LogCaptureFixture
) -> None:
    closed = threading.Event()

    def hostile(event: StepEnded) -> None:
        if event.step == 1:
            raise exc_type()

    failures: list[Event] = []

    async def on_failure(event: CallbackFailed) -> None:
        failures.append(event)

    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus:
            bus.subscribe(on_failure, events=(CallbackFailed,))
            sub = bus.subscribe(hostile, events=(StepEnded,), on_close=closed.set)
            for i in range(5):
                bus.publish(step_event(i))
            assert (await bus.drain(timeout=5)).ok  # not left waiting for a dead thread
            st = sub.stats()
            assert await sub.aclose(5)
    assert closed.is_set()  # its thread lived on to run on_close (teardown)
    assert (st.delivered, st.failed, st.pending) == (4, 1, 0)
    [failed] = failures
    assert isinstance(failed, CallbackFailed) and failed.subscriber == "hostile"
    [record] = [r for r in warnings_log.records if r.getMessage().startswith("callback failed")]
    assert "callback=hostile" in record.getMessage() and exc_type.__name__ in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is exc_type  # the traceback


# -- refused before the first step -----------------------------------------------------


async def test_the_same_callback_instance_twice_is_refused(tmp_path: Path) -> None:
    cb = DefSibling()
    with pytest.raises(ValueError, match=r"callbacks\[1\] is the same DefSibling instance"):
        ev.TrainingLoop(step, num_steps=3, output_dir=tmp_path, callbacks=[cb, cb])
    loop = ev.TrainingLoop(step, num_steps=3, output_dir=tmp_path, callbacks=[cb])
    loop.callbacks.append(cb)  # after construction: still refused before the first step
    with anyio.fail_after(WAIT):
        with pytest.raises(ValueError, match="same DefSibling instance"):
            await loop.run()
    assert cb.envelopes == []


async def test_run_while_the_same_loop_runs_is_refused(tmp_path: Path) -> None:
    started, finish = anyio.Event(), anyio.Event()

    async def gated(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        started.set()
        await finish.wait()
        return {}

    loop = ev.TrainingLoop(gated, num_steps=2, output_dir=tmp_path)
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            await started.wait()
            with pytest.raises(RuntimeError, match="already running"):
                await loop.run()
            finish.set()
    assert loop.artifacts is not None and loop.artifacts.status == "completed"
    assert (await loop.run()).status == "completed"  # and again once it ended


@pytest.mark.parametrize("key", ["", "same"])
async def test_a_run_key_active_on_a_shared_bus_is_refused(key: str, tmp_path: Path) -> None:
    started, finish = anyio.Event(), anyio.Event()

    async def gated(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        started.set()
        await finish.wait()
        return {}

    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=5) as bus, anyio.create_task_group() as tg:
            first = ev.TrainingLoop(gated, num_steps=1, output_dir=tmp_path, run_key=key, bus=bus)
            tg.start_soon(first.run)
            await started.wait()
            second = ev.TrainingLoop(step, num_steps=1, output_dir=tmp_path, run_key=key, bus=bus)
            shown = key or "run"  # no key given: the default one
            with pytest.raises(ValueError, match=f"run_key={shown!r} is already active"):
                await second.run()
            other = ev.TrainingLoop(step, num_steps=1, output_dir=tmp_path, run_key="x", bus=bus)
            assert (await other.run()).status == "completed"  # another key is fine
            finish.set()


# -- every event counted once ------------------------------------------------------------


async def test_a_hung_def_callback_is_counted_per_event_and_its_rest_dropped(
    tmp_path: Path,
) -> None:
    release = threading.Event()
    handled: list[int] = []

    class HangsAtTen(ev.Callback):
        hook_timeout = 0.05

        def on_step_end(self, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            if i == 10:
                release.wait(WAIT)
            handled.append(i)

    counter = AsyncSibling()
    loop = ev.TrainingLoop(
        step, num_steps=200, output_dir=tmp_path, run_key="hung",
        callbacks=[HangsAtTen(), counter], drain_timeout=2,
    )  # fmt: skip
    try:
        with anyio.fail_after(WAIT):
            artifacts = await loop.run()
    finally:
        release.set()
    h = artifacts.callback_report["HangsAtTen"]
    assert h.stuck
    assert h.delivered == 10  # events, not batches: steps 0..9 returned
    assert h.failed == 1  # the call abandoned at its timeout
    steps_seen = sum(1 for e in counter.envelopes if isinstance(e.event, StepEnded))
    assert steps_seen == 200
    assert h.dropped == 200 - 11 and h.pending == 0  # never reachable: counted, not lost
    assert h.delivered + h.failed + h.dropped + h.pending == steps_seen


# -- failing is cheap, and health tells the truth ----------------------------------------
#
# The fault table's rows for a callback that fails on every call: what it costs is
# counted here (log records, CallbackFailed events and their counts; the time it costs
# is benchmarks/bench_steps.py's), and what a failed setup means.


class FailureWatch(ev.Callback):
    """Keeps every ``CallbackFailed`` of the run (an in-process, lossless sibling)."""

    def __init__(self) -> None:
        self.failures: list[CallbackFailed] = []

    async def on_event(self, state: ev.LoopState, event: Event) -> None:
        if isinstance(event, CallbackFailed):
            self.failures.append(event)


def always_failing(kind: str, *, flush_fails: bool = False) -> ev.Callback:
    """Raises on every ``on_step_end`` (and, with ``flush_fails``, every ``flush``)."""
    counts = {"steps": 0, "flushes": 0}

    def step_body(self: Any, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
        counts["steps"] += 1
        raise ConnectionError("logging server down")

    def flush_body(self: Any) -> None:
        counts["flushes"] += 1
        if flush_fails:
            raise OSError("disk full")

    ns: dict[str, Any] = {"counts": counts}
    if kind == "def":
        ns["on_step_end"], ns["flush"] = step_body, flush_body
    else:

        async def on_step_end(self: Any, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            step_body(self, state, i, b, m)

        async def flush(self: Any) -> None:
            flush_body(self)

        ns["on_step_end"], ns["flush"] = on_step_end, flush
    return type("Failing", (ev.Callback,), ns)()


@pytest.mark.parametrize("kind", ["def", "async"])
@pytest.mark.parametrize("flush_fails", [False, True])
async def test_a_callback_failing_on_every_call_costs_one_record_then_sums(
    kind: str, flush_fails: bool, tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    n = 600
    hostile, watch = always_failing(kind, flush_fails=flush_fails), FailureWatch()
    loop = ev.TrainingLoop(
        step, num_steps=n, output_dir=tmp_path, run_key="fails", callbacks=[hostile, watch]
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "completed" and artifacts.steps_completed == n
    h = artifacts.callback_report["Failing"]
    assert (h.delivered, h.failed, h.dropped, h.pending, h.stuck) == (0, n, 0, 0, False)
    records = [r for r in warnings_log.records if r.name == "evsys_async"]
    firsts = [r for r in records if r.getMessage().startswith("callback failed")]
    # one record, with its traceback, per kind of failure: not one per failure
    assert sorted(r.exc_info[0].__name__ for r in firsts if r.exc_info) == (
        ["ConnectionError", "OSError"] if flush_fails else ["ConnectionError"]
    )
    summaries = [r for r in records if " more " in r.getMessage()]
    assert len(summaries) <= 2 * 3 and all(r.exc_info is None for r in summaries)
    # CallbackFailed is coalesced the same way; the counts add up to every failure
    on_step = [f for f in watch.failures if f.hook == "on_step_end"]
    assert sum(f.count for f in on_step) == h.failed == hostile.counts["steps"]  # type: ignore[attr-defined]
    on_flush = [f for f in watch.failures if f.hook == "flush"]
    flushes = hostile.counts["flushes"]  # type: ignore[attr-defined]
    assert sum(f.count for f in on_flush) == (flushes if flush_fails else 0)
    assert len(watch.failures) <= 2 * 4  # the first of each kind and a few sums, not n


@pytest.mark.parametrize("kind", ["def", "async"])
@pytest.mark.parametrize("without_setup", [False, True])
async def test_a_setup_that_raises_disables_the_callback_unless_it_runs_without(
    kind: str, without_setup: bool, tmp_path: Path
) -> None:
    calls: list[str] = []

    def setup_body(self: Any, state: ev.LoopState) -> None:
        raise ConnectionError("tracking server refused")

    def step_body(self: Any, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
        calls.append("step")

    def teardown_body(self: Any, state: ev.LoopState) -> None:
        calls.append("teardown")

    ns: dict[str, Any] = {"runs_without_setup": without_setup}
    if kind == "def":
        ns.update(setup=setup_body, on_step_end=step_body, teardown=teardown_body)
    else:

        async def setup(self: Any, state: ev.LoopState) -> None:
            setup_body(self, state)

        async def on_step_end(self: Any, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            step_body(self, state, i, b, m)

        async def teardown(self: Any, state: ev.LoopState) -> None:
            teardown_body(self, state)

        ns.update(setup=setup, on_step_end=on_step_end, teardown=teardown)
    half_built = type("HalfBuilt", (ev.Callback,), ns)()
    sibling = AsyncSibling()
    loop = ev.TrainingLoop(
        step, num_steps=STEPS, output_dir=tmp_path, run_key="setup", callbacks=[half_built, sibling]
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "completed" and artifacts.steps_completed == STEPS
    h = artifacts.callback_report["HalfBuilt"]
    assert h.delivered + h.failed + h.dropped + h.pending == STEPS
    if without_setup:
        assert calls.count("step") == STEPS and (h.delivered, h.disabled) == (STEPS, None)
    else:  # never a hook on the half-built object; teardown still runs, to clean up
        assert calls == ["teardown"]
        assert (h.delivered, h.dropped) == (0, STEPS)
        assert h.disabled == "setup failed: ConnectionError: tracking server refused"
    steps_seen = [e for e in sibling.envelopes if isinstance(e.event, StepEnded)]
    assert len(steps_seen) == STEPS  # the sibling saw everything


async def test_four_runs_each_with_a_failing_callback_all_drain_with_nothing_stuck(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    n = 500
    hostiles = {f"r{k}": always_failing("def" if k % 2 else "async") for k in range(4)}
    results: dict[str, ev.LoopArtifacts] = {}

    async def one(key: str) -> None:
        loop = ev.TrainingLoop(
            step, num_steps=n, output_dir=tmp_path, run_key=key, bus=bus,
            callbacks=[hostiles[key], CsvMetricsCallback("metrics.csv")], drain_timeout=WAIT,
        )  # fmt: skip
        results[key] = await loop.run()

    with anyio.fail_after(WAIT):
        async with ev.EventBus(close_timeout=WAIT) as bus, anyio.create_task_group() as tg:
            for key in hostiles:
                tg.start_soon(one, key)
    for key, artifacts in results.items():
        assert artifacts.status == "completed" and artifacts.steps_completed == n
        report = artifacts.callback_report
        [h] = [h for name, h in report.items() if name.startswith("Failing")]  # Failing#2 ...
        assert (h.delivered, h.failed, h.dropped, h.pending, h.stuck) == (0, n, 0, 0, False), key
        [csv_h] = [h for name, h in report.items() if name.startswith("csv_metrics")]
        # the steps and TrainEnded (the writer always writes the last step)
        assert (csv_h.delivered, csv_h.failed, csv_h.pending, csv_h.stuck) == (n + 1, 0, 0, False)
    # nobody waited for a deadline: nothing was left behind or reported stuck
    texts = [r.getMessage() for r in warnings_log.records]
    assert not [t for t in texts if "deadline" in t or "left behind" in t or "stuck" in t]
