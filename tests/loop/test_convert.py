"""The training thread never waits for a device (``loop/_convert.py``).

A step's metric on a device is copied there and converted to a float by the
run's converter thread, in step order, before its ``StepEnded`` is published.
Counted with a stand-in device tensor (``tests/loop/devices.py``), for each
runner (``run()``, ``run_sync()``) x step kind (``def``, ``async def``) x
backend, and under cancellation: no conversion on the thread that ran the
steps, every value and every event in its order.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async._util.signals import Interrupted
from evsys_async.events import (
    CheckpointSaved,
    EvalEnded,
    StepEnded,
    StopRequested,
    TrainEnded,
)
from tests.loop.devices import RUNNERS, WAIT, Conversions, OnDevice, run, step_of

KINDS = pytest.mark.parametrize("kind", ["def", "async"])
BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])


class Log(ev.Callback):
    """Every event of the run, in order, as a callback sees it."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    async def on_envelope(self, state: ev.LoopState, envelope: ev.Envelope) -> None:
        self.events.append(envelope.event)

    def metrics(self) -> list[tuple[int, dict[str, float]]]:
        return [(e.step, dict(e.metrics)) for e in self.events if isinstance(e, StepEnded)]


def expected(step_idx: int) -> dict[str, float]:
    if step_idx % 3 == 2:  # every third step: plain floats only, queued behind the others
        return {"loss": step_idx / 2}
    return {"loss": step_idx / 2, "lr": 0.1, "acc/0": 1.0 + step_idx, "acc/1": 2.0}


class Steps:
    """A step whose metrics are mostly on the device; records the thread it ran on."""

    def __init__(self, conversions: Conversions) -> None:
        self.conversions = conversions
        self.threads: set[str] = set()
        self.device_values = 0

    def __call__(self, state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        self.threads.add(threading.current_thread().name)
        if step_idx % 3 == 2:
            return {"loss": step_idx / 2}
        self.device_values += 3
        on = self.conversions
        return {
            "loss": OnDevice(step_idx / 2, on),
            "lr": 0.1,
            "acc": [OnDevice(1.0 + step_idx, on), OnDevice(2.0, on)],
        }


def check_order(events: list[ev.Event], num_steps: int) -> None:
    """Each step's StepEnded once, in order; a step's other events after it; TrainEnded last."""
    published: list[int] = []
    for event in events:
        if isinstance(event, StepEnded):
            published.append(event.step)
        elif isinstance(event, EvalEnded | StopRequested) or (
            isinstance(event, CheckpointSaved) and event.step >= 0
        ):
            assert published and published[-1] == event.step, (type(event).__name__, event.step)
    assert published == list(range(num_steps))
    assert isinstance(events[-1], TrainEnded)


class Acc:
    name, run_every = "val", 4

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"acc": step_idx / 100}


@pytest.mark.parametrize("runner", RUNNERS)
@KINDS
@BACKENDS
def test_device_metrics_are_converted_off_the_training_thread_in_order(
    runner: str, kind: str, backend: str, tmp_path: Path
) -> None:
    conversions = Conversions()
    steps, log = Steps(conversions), Log()
    loop = ev.TrainingLoop(
        step_of(kind, steps), num_steps=30, output_dir=tmp_path, callbacks=[log],
        evaluators=[Acc()], save_every=5, checkpoint=lambda state, name: None,
    )  # fmt: skip
    artifacts = run(loop, runner, backend)
    assert artifacts.status == "completed"
    assert log.metrics() == [(i, expected(i)) for i in range(30)]
    check_order(log.events, 30)
    # each device value converted once, none of them where the steps ran
    assert len(conversions.threads) == steps.device_values == 60
    assert set(conversions.threads) == {f"evsys-convert:{loop.run_key}"}
    assert not steps.threads & set(conversions.threads)


@pytest.mark.parametrize("runner", RUNNERS)
@KINDS
@BACKENDS
def test_a_running_tensor_changed_in_place_later_keeps_its_logged_values(
    runner: str, kind: str, backend: str, tmp_path: Path
) -> None:
    conversions = Conversions()
    total = OnDevice(0.0, conversions)

    def body(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        total.add_(1.0)  # the next steps change the tensor this one returned
        return {"sum": total}

    log = Log()
    loop = ev.TrainingLoop(step_of(kind, body), num_steps=20, output_dir=tmp_path, callbacks=[log])
    assert run(loop, runner, backend).status == "completed"
    assert log.metrics() == [(i, {"sum": i + 1.0}) for i in range(20)]
    assert len(conversions.threads) == 20


@pytest.mark.parametrize("runner", RUNNERS)
@KINDS
@BACKENDS
def test_a_controlling_callback_on_step_ended_waits_for_the_conversion(
    runner: str, kind: str, backend: str, tmp_path: Path
) -> None:
    seen: list[tuple[int, float]] = []

    class StopAtSeven(ev.Callback):
        controls_loop = True

        def on_step_end(self, state: ev.LoopState, i: int, b: Any, metrics: Any) -> None:
            seen.append((i, metrics["loss"]))
            if metrics["loss"] == 7.0:  # decided on the converted value
                state.request_stop("seven")

    conversions = Conversions()
    ran: list[str] = []

    def body(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        ran.append(threading.current_thread().name)
        return {"loss": OnDevice(float(step_idx), conversions)}

    log = Log()
    loop = ev.TrainingLoop(
        step_of(kind, body), num_steps=100, output_dir=tmp_path, callbacks=[StopAtSeven(), log]
    )
    artifacts = run(loop, runner, backend)
    assert artifacts.status == "stopped" and artifacts.steps_completed == 8
    assert seen == [(i, float(i)) for i in range(8)]
    check_order(log.events, 8)
    assert len(conversions.threads) == 8 and not set(ran) & set(conversions.threads)


@pytest.mark.anyio
@KINDS
async def test_cancelled_mid_run_every_step_that_ran_is_published_once_in_order(
    kind: str, tmp_path: Path
) -> None:
    conversions = Conversions()
    going = threading.Event()
    ran: list[int] = []

    def body(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        ran.append(step_idx)
        if step_idx == 20:
            going.set()
        return {"loss": OnDevice(float(step_idx), conversions)}

    log = Log()
    loop = ev.TrainingLoop(
        step_of(kind, body), num_steps=10**7, output_dir=tmp_path, callbacks=[log],
        evaluators=[Acc()],
    )  # fmt: skip
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            await anyio.to_thread.run_sync(going.wait, WAIT)
            tg.cancel_scope.cancel()
    artifacts = loop.artifacts
    assert artifacts is not None and artifacts.status == "cancelled"
    n = artifacts.steps_completed
    assert n >= 21 and ran == list(range(n))
    assert log.metrics() == [(i, {"loss": float(i)}) for i in range(n)]
    check_order(log.events, n)
    assert len(conversions.threads) == n
    assert set(conversions.threads) == {f"evsys-convert:{loop.run_key}"}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@KINDS
@BACKENDS
def test_run_sync_interrupted_publishes_every_step_that_ran(
    kind: str, backend: str, tmp_path: Path
) -> None:
    conversions = Conversions()
    ran: list[int] = []

    def body(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        ran.append(step_idx)
        if step_idx == 20:  # Ctrl-C: the run ends after the step in progress
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
        return {"loss": OnDevice(float(step_idx), conversions)}

    log = Log()
    loop = ev.TrainingLoop(
        step_of(kind, body), num_steps=10**7, output_dir=tmp_path, callbacks=[log]
    )
    with pytest.raises(Interrupted):
        loop.run_sync(backend=backend)
    artifacts = loop.artifacts
    assert artifacts is not None and artifacts.status == "cancelled"
    n = artifacts.steps_completed
    assert n >= 21 and ran == list(range(n))
    assert log.metrics() == [(i, {"loss": float(i)}) for i in range(n)]
    check_order(log.events, n)
    assert len(conversions.threads) == n


@pytest.mark.anyio
@KINDS
async def test_a_run_on_the_cpu_starts_no_converter(kind: str, tmp_path: Path) -> None:
    names: set[str] = set()

    def body(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        names.update(t.name for t in threading.enumerate())
        return {"loss": 1.0}

    loop = ev.TrainingLoop(step_of(kind, body), num_steps=10, output_dir=tmp_path)
    with anyio.fail_after(WAIT):
        await loop.run()
    assert not any(name.startswith("evsys-convert") for name in names)


@pytest.mark.anyio
@pytest.mark.parametrize("strict", [False, True])
async def test_a_device_value_of_several_elements_is_not_a_number(
    strict: bool, tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    conversions = Conversions()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        return {"loss": 1.0, "logits": OnDevice(0.0, conversions, numel=10)}

    log = Log()
    loop = ev.TrainingLoop(step, num_steps=5, output_dir=tmp_path, callbacks=[log], strict=strict)
    with anyio.fail_after(WAIT):
        if strict:
            with pytest.raises(TypeError, match=r"'logits' = .*which is not a number"):
                await loop.run()
            return
        await loop.run()
    assert log.metrics() == [(i, {"loss": 1.0}) for i in range(5)]
    assert conversions.threads == []  # its shape said so: no wait for the device
    [record] = [r for r in warnings_log.records if "not a number" in r.getMessage()]
    assert "key=logits type=OnDevice" in record.getMessage()


@pytest.mark.anyio
@pytest.mark.parametrize("strict", [False, True])
async def test_a_value_the_device_cannot_convert_is_skipped_once_said(
    strict: bool, tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    conversions = Conversions()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        bad = OnDevice(1.0, conversions)
        bad.error = RuntimeError("device-side assert triggered")
        return {"loss": float(step_idx), "bad": bad}

    log = Log()
    loop = ev.TrainingLoop(step, num_steps=6, output_dir=tmp_path, callbacks=[log], strict=strict)
    with anyio.fail_after(WAIT):
        if strict:  # a later step with device values fails with it
            with pytest.raises(RuntimeError, match="device-side assert"):
                await loop.run()
            assert loop.artifacts is not None and loop.artifacts.status == "failed"
            return
        await loop.run()
    assert log.metrics() == [(i, {"loss": float(i)}) for i in range(6)]
    [record] = [r for r in warnings_log.records if "could not be converted" in r.getMessage()]
    assert "key=bad" in record.getMessage() and "device-side assert" in record.getMessage()


@pytest.mark.anyio
@pytest.mark.parametrize("eval_mode", ["inline", "background"])
async def test_an_evaluators_device_values_are_converted_off_the_loop(
    eval_mode: str, tmp_path: Path
) -> None:
    conversions = Conversions()

    class OnGpu:
        name, run_every = "val", 2

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, Any]:
            return {"acc": OnDevice(step_idx / 10, conversions)}

    log = Log()
    loop = ev.TrainingLoop(
        step_of("async", lambda s, i: {"loss": OnDevice(1.0, conversions)}), num_steps=6,
        output_dir=tmp_path, callbacks=[log], evaluators=[OnGpu()], eval_mode=eval_mode,  # type: ignore[arg-type]
    )  # fmt: skip
    with anyio.fail_after(WAIT):
        await loop.run()
    evals = sorted((e.step, dict(e.metrics)) for e in log.events if isinstance(e, EvalEnded))
    assert evals == [(1, {"acc": 0.1}), (3, {"acc": 0.3}), (5, {"acc": 0.5})]
    assert len(conversions.threads) == 9
    assert set(conversions.threads) == {f"evsys-convert:{loop.run_key}"}


@pytest.mark.anyio
async def test_a_converted_step_is_published_while_the_next_step_still_runs(
    tmp_path: Path,
) -> None:
    """The loop publishes converted steps as it passes (cheaper than a wake per step);
    when a step takes long, the converter publishes the one before it by itself."""
    conversions = Conversions()
    seen: dict[int, anyio.Event] = {i: anyio.Event() for i in range(6)}

    class Seen(ev.Callback):
        async def on_step_end(self, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            seen[i].set()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        if step_idx > 0:
            await seen[step_idx - 1].wait()  # never set unless step_idx - 1 goes out now
        return {"loss": OnDevice(float(step_idx), conversions)}

    log = Log()
    loop = ev.TrainingLoop(step, num_steps=6, output_dir=tmp_path, callbacks=[Seen(), log])
    with anyio.fail_after(WAIT):
        assert (await loop.run()).status == "completed"
    assert log.metrics() == [(i, {"loss": float(i)}) for i in range(6)]
