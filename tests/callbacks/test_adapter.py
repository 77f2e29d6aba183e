"""Callback <-> bus: which hook runs, lifecycle and threads, dispatch."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.callbacks._adapter import CallbackAdapter
from evsys_async.events import (
    CallbackFailed,
    EvalEnded,
    EvalFailed,
    RunStarted,
    StepEnded,
    StopRequested,
    TrainEnded,
    TrainStarted,
)

pytestmark = pytest.mark.anyio

WAIT = 30.0  # the fail_after around every wait: generous, never reached when all is well


class LateStep(StepEnded):
    """A user event that *is* a StepEnded: the nearest hook in its MRO handles it."""

    late: bool = True


class Note(ev.Event):
    text: str


def state_for(tmp_path: Path) -> ev.LoopState:
    return ev.LoopState(num_steps=3, output_dir=tmp_path)


async def run_events(cb: ev.Callback, state: ev.LoopState, events: list[ev.Event]) -> Any:
    async with ev.EventBus() as bus:
        adapter = CallbackAdapter(cb, state)
        sub = adapter.subscribe(bus)
        for event in events:
            bus.publish(event)
        with anyio.fail_after(10):
            assert await sub.aclose(10)
        return bus.stats()[adapter.name]


async def test_exactly_one_hook_runs_per_event(tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    class Cb(ev.Callback):
        def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
            calls.append(("on_step_end", type(state).__name__ + f":{step_idx}"))

        def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
            calls.append(("on_event", type(event).__name__))

    events: list[ev.Event] = [
        StepEnded(step=0, num_steps=3),
        LateStep(step=1, num_steps=3),
        StopRequested(step=1, reason="r"),
        EvalFailed(step=1, eval_name="v", error="e"),
        CallbackFailed(subscriber="x", hook="h", event_type="t", error="e"),
        Note(text="hi"),
        RunStarted(arm="a"),  # experiment scope: dispatch's job, never a named hook
        EvalEnded(step=1, eval_name="v", metrics={}),  # not overridden -> on_event
    ]
    with anyio.fail_after(WAIT):
        await run_events(Cb(), state_for(tmp_path), events)
    assert calls == [
        ("on_step_end", "LoopState:0"),
        ("on_step_end", "LoopState:1"),
        ("on_event", "StopRequested"),
        ("on_event", "EvalFailed"),
        ("on_event", "CallbackFailed"),
        ("on_event", "Note"),
        ("on_event", "EvalEnded"),
    ]


async def test_subscribed_only_to_overridden_hooks(tmp_path: Path) -> None:
    class OnlyEval(ev.Callback):
        def __init__(self) -> None:
            self.evals = 0

        async def on_eval(self, state: ev.LoopState, step_idx: int, name: str, m: Any) -> None:
            self.evals += 1

    cb = OnlyEval()
    with anyio.fail_after(WAIT):
        stats = await run_events(
            cb,
            state_for(tmp_path),
            [StepEnded(step=i, num_steps=3) for i in range(3)]
            + [EvalEnded(step=2, eval_name="v", metrics={"acc": 1.0})],
        )
    assert cb.evals == 1
    assert stats.delivered == 1  # the StepEnded events never reached it


async def test_on_envelope_sees_every_event_after_the_named_hook(tmp_path: Path) -> None:
    order: list[Any] = []

    class Log(ev.Callback):
        async def on_train_start(self, state: ev.LoopState) -> None:
            order.append("named")

        async def on_envelope(self, state: ev.LoopState, envelope: ev.Envelope) -> None:
            order.append((envelope.seq, type(envelope.event).__name__))

    with anyio.fail_after(WAIT):
        await run_events(
            Log(),
            state_for(tmp_path),
            [TrainStarted(num_steps=3), StepEnded(step=0, num_steps=3), Note(text="x")],
        )
    assert order == ["named", (0, "TrainStarted"), (1, "StepEnded"), (2, "Note")]


async def test_def_callback_lifecycle_runs_in_its_own_thread(tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []

    class Files(ev.Callback):
        # deliberately no super().__init__(): Callback must not need it
        def __init__(self) -> None:
            self.flushes = 0

        def setup(self, state: ev.LoopState) -> None:
            seen.append(("setup", threading.get_ident()))

        def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
            seen.append(("step", threading.get_ident()))

        def flush(self) -> None:
            self.flushes += 1

        def teardown(self, state: ev.LoopState) -> None:
            seen.append(("teardown", threading.get_ident()))

    cb = Files()
    with anyio.fail_after(WAIT):
        await run_events(
            cb, state_for(tmp_path), [StepEnded(step=i, num_steps=3) for i in range(3)]
        )
    names = [n for n, _ in seen]
    assert names == ["setup", "step", "step", "step", "teardown"]
    threads = {t for _, t in seen}
    assert len(threads) == 1
    assert loop_thread not in threads
    assert cb.flushes >= 1


async def test_async_callback_runs_on_the_loop(tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []

    class A(ev.Callback):
        async def setup(self, state: ev.LoopState) -> None:
            seen.append(("setup", threading.get_ident()))

        async def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            seen.append(("step", threading.get_ident()))

        async def teardown(self, state: ev.LoopState) -> None:
            seen.append(("teardown", threading.get_ident()))

    adapter = CallbackAdapter(A(), state_for(tmp_path))
    assert adapter.is_async
    with anyio.fail_after(WAIT):
        await run_events(A(), state_for(tmp_path), [StepEnded(step=0, num_steps=3)])
    assert seen == [("setup", loop_thread), ("step", loop_thread), ("teardown", loop_thread)]


async def test_mixed_callback_runs_in_a_thread_and_its_async_hooks_on_the_loop(
    tmp_path: Path,
) -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, bool]] = []

    class Mixed(ev.Callback):
        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            seen.append(("step", threading.get_ident() == loop_thread))

        async def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
            await anyio.lowlevel.checkpoint()
            seen.append(("end", threading.get_ident() == loop_thread))

    assert not CallbackAdapter(Mixed(), state_for(tmp_path)).is_async
    with anyio.fail_after(WAIT):
        await run_events(
            Mixed(),
            state_for(tmp_path),
            [
                StepEnded(step=0, num_steps=1),
                TrainEnded(status="completed", steps_completed=1, num_steps=1),
            ],
        )
    assert seen == [("step", False), ("end", True)]


async def test_wants_batch_gets_only_the_newest_batch(tmp_path: Path) -> None:
    class B(ev.Callback):
        wants_batch = True

        def __init__(self) -> None:
            self.batches: list[Any] = []

        async def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
            self.batches.append(batch)

    cb = B()
    async with ev.EventBus() as bus:
        adapter = CallbackAdapter(cb, state_for(tmp_path))
        sub = adapter.subscribe(bus)
        for i in range(3):
            adapter.offer_batch(i, f"batch{i}")
            bus.publish(StepEnded(step=i, num_steps=3))
        with anyio.fail_after(10):
            await sub.aclose(10)
    # all three were pending at once: only step 2's batch was still held
    assert cb.batches == [None, None, "batch2"]


def test_signature_checked_when_adapted(tmp_path: Path) -> None:
    class Bad(ev.Callback):
        def on_eval(self, state: ev.LoopState, step_idx: int) -> None:  # type: ignore[override]
            pass

    with pytest.raises(TypeError, match=r"Bad\.on_eval.*def on_eval\(self, state"):
        CallbackAdapter(Bad(), state_for(tmp_path))


async def test_dispatch_order_isolation_and_threads(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    loop_thread = threading.get_ident()
    order: list[tuple[str, bool]] = []
    ctx = ev.LogContext()

    class First(ev.Callback):
        def on_run_start(self, ctx: ev.LogContext) -> None:
            ctx.ids["run"] = "r-1"
            order.append(("first", threading.get_ident() == loop_thread))

    class Broken(ev.Callback):
        async def on_run_start(self, ctx: ev.LogContext) -> None:
            raise RuntimeError("store offline")

    class Last(ev.Callback):
        async def on_run_start(self, ctx: ev.LogContext) -> None:
            order.append((f"last saw {ctx.ids['run']}", threading.get_ident() == loop_thread))

    class Silent(ev.Callback):
        pass

    with anyio.fail_after(10):
        await ev.dispatch([First(), Broken(), Silent(), Last()], "on_run_start", ctx)
    assert order == [("first", False), ("last saw r-1", True)]
    assert "callback failed: callback=Broken hook=on_run_start" in warnings_log.text
    assert "RuntimeError: store offline" in warnings_log.text


async def test_dispatch_passes_keywords(tmp_path: Path) -> None:
    got: list[Any] = []

    class Bench(ev.Callback):
        async def on_benchmark_eval(
            self, ctx: Any, eval_result: Any, predictions: Any, *, step: int | None = None
        ) -> None:
            got.append((eval_result, predictions, step))

    with anyio.fail_after(WAIT):
        await ev.dispatch([Bench()], "on_benchmark_eval", ev.LogContext(), {"acc": 1}, [1], step=4)
    assert got == [({"acc": 1}, [1], 4)]


async def test_dispatch_a_base_exception_in_a_def_hook_is_its_failure(
    warnings_log: pytest.LogCaptureFixture,
) -> None:
    order: list[str] = []

    class Exits(ev.Callback):
        def on_run_start(self, ctx: Any) -> None:
            order.append("exits")
            raise SystemExit(3)  # in its thread: a failure, never the process's exit

    class After(ev.Callback):
        async def on_run_start(self, ctx: Any) -> None:
            order.append("after")

    with anyio.fail_after(10):
        await ev.dispatch([Exits(), After()], "on_run_start", None)
    assert order == ["exits", "after"]
    assert any("SystemExit" in r.getMessage() for r in warnings_log.records)


# -- health: setup, failures in a row, degraded ------------------------------------


def half_built(kind: str, *, without_setup: bool = False) -> ev.Callback:
    """A client whose ``setup`` cannot connect; its hooks would fail on what it lacks."""
    calls: list[str] = []

    class Client(ev.Callback):
        runs_without_setup = without_setup

        def __init__(self) -> None:
            self.calls = calls

        def setup(self, state: ev.LoopState) -> None:
            raise ConnectionError("refused")

        def teardown(self, state: ev.LoopState) -> None:
            calls.append("teardown")

    if kind == "def":

        def on_step_end(self: Any, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            calls.append(f"step {i}")

    else:

        async def on_step_end(self: Any, state: ev.LoopState, i: int, b: Any, m: Any) -> None:  # type: ignore[misc]
            calls.append(f"step {i}")

        async def setup(self: Any, state: ev.LoopState) -> None:
            raise ConnectionError("refused")

        async def teardown(self: Any, state: ev.LoopState) -> None:
            calls.append("teardown")

        Client.setup = setup  # type: ignore[method-assign]
        Client.teardown = teardown  # type: ignore[method-assign]
    Client.on_step_end = on_step_end  # type: ignore[method-assign]
    return Client()


@pytest.mark.parametrize("kind", ["def", "async"])
async def test_a_callback_whose_setup_failed_is_disabled(kind: str, tmp_path: Path) -> None:
    cb = half_built(kind)
    steps = [StepEnded(step=i, num_steps=3) for i in range(3)]
    with anyio.fail_after(WAIT):
        st = await run_events(cb, state_for(tmp_path), steps)
    assert cb.calls == ["teardown"]  # no hook on the half-built object; teardown cleans up
    assert (st.delivered, st.failed, st.dropped, st.pending) == (0, 0, 3, 0)
    assert st.disabled == "setup failed: ConnectionError: refused"
    assert st.failed_hooks == {"setup": 1}


@pytest.mark.parametrize("kind", ["def", "async"])
async def test_runs_without_setup_keeps_it_running(kind: str, tmp_path: Path) -> None:
    cb = half_built(kind, without_setup=True)
    steps = [StepEnded(step=i, num_steps=3) for i in range(3)]
    with anyio.fail_after(WAIT):
        st = await run_events(cb, state_for(tmp_path), steps)
    assert cb.calls == ["step 0", "step 1", "step 2", "teardown"]
    assert (st.delivered, st.dropped, st.disabled) == (3, 0, None)
    assert st.failed_hooks == {"setup": 1}


@pytest.mark.parametrize("kind", ["def", "async"])
async def test_max_consecutive_failures_switches_a_callback_off(kind: str, tmp_path: Path) -> None:
    calls: list[int] = []

    class Flaky(ev.Callback):
        max_consecutive_failures = 4

        def on_step_end(self, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            calls.append(i)
            if i >= 2:
                raise RuntimeError("service down")

    if kind == "async":

        async def on_step_end(self: Any, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            calls.append(i)
            if i >= 2:
                raise RuntimeError("service down")

        Flaky.on_step_end = on_step_end  # type: ignore[method-assign]
    steps = [StepEnded(step=i, num_steps=20) for i in range(20)]
    with anyio.fail_after(WAIT):
        st = await run_events(Flaky(), state_for(tmp_path), steps)
    assert calls == [0, 1, 2, 3, 4, 5]  # the 4th failure in a row was the last call
    assert (st.delivered, st.failed, st.dropped, st.pending) == (2, 4, 14, 0)
    assert st.disabled == "4 failures in a row (the last: RuntimeError: service down)"


async def test_the_adapter_reports_a_callbacks_degraded_and_disabled_reason(
    tmp_path: Path,
) -> None:
    class Writer(ev.Callback):
        def on_step_end(self, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            if i == 1:
                self.degraded = ev.Degraded("disk full", rows_lost=1, missing_from_step=1)
                self.disabled_reason = "gave up"

    cb = Writer()
    adapter = CallbackAdapter(cb, state_for(tmp_path))
    assert adapter.degraded is None and adapter.disabled_reason is None
    async with ev.EventBus() as bus:
        sub = adapter.subscribe(bus)
        for i in range(3):
            bus.publish(StepEnded(step=i, num_steps=3))
        with anyio.fail_after(WAIT):
            assert await sub.aclose(WAIT)
    assert adapter.degraded == ev.Degraded("disk full", rows_lost=1, missing_from_step=1)
    assert adapter.disabled_reason == "gave up"
