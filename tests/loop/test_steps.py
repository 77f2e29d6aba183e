"""The steps and the step boundary, for an ``async def`` step and a ``def`` step.

A ``def`` step runs back to back in its step thread and calls the event loop
only at a boundary with work (an eval or checkpoint due, a request, a
controlling callback, a stop); ``run_sync()`` runs it on the calling thread.
Each promise is checked for both kinds of step, on asyncio and trio.
"""

from __future__ import annotations

import contextvars
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.events import CheckpointSaved, EvalEnded, StepEnded, StopRequested

WAIT = 30


def make_step(kind: str, record: list[int] | None = None, fail_at: int | None = None) -> Any:
    def body(step_idx: int) -> dict[str, float]:
        if record is not None:
            record.append(step_idx)
        if step_idx == fail_at:
            raise RuntimeError(f"nan at {step_idx}")
        return {"loss": 1.0 / (step_idx + 1)}

    if kind == "def":

        def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
            return body(step_idx)

        return step

    async def astep(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return body(step_idx)

    return astep


class Log(ev.Callback):
    """Every event, in order, as the callback saw it."""

    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    async def on_envelope(self, state: ev.LoopState, envelope: ev.Envelope) -> None:
        self.events.append(envelope.event)

    def steps(self) -> list[int]:
        return [e.step for e in self.events if isinstance(e, StepEnded)]


class Acc:
    name, run_every = "val", 4

    def __init__(self) -> None:
        self.at: list[int] = []

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        self.at.append(step_idx)
        return {"acc": step_idx / 100}


KINDS = pytest.mark.parametrize("kind", ["async", "def"])


@pytest.mark.anyio
@KINDS
async def test_every_step_once_in_order_with_evals_and_checkpoints(
    kind: str, tmp_path: Path
) -> None:
    ran: list[int] = []
    saved: list[str] = []

    def checkpoint(state: ev.LoopState, name: str) -> str:
        saved.append(name)
        return f"ckpt/{name}"

    log, acc = Log(), Acc()
    loop = ev.TrainingLoop(
        make_step(kind, ran), num_steps=20, output_dir=tmp_path, callbacks=[log],
        evaluators=[acc], save_every=5, checkpoint=checkpoint,
    )  # fmt: skip
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "completed" and artifacts.steps_completed == 20
    assert ran == log.steps() == list(range(20))
    assert acc.at == [3, 7, 11, 15, 19]  # after step i when (i + 1) % 4 == 0
    # one save per step: the shutdown's "final" is not saved again after step_20
    assert saved == ["step_5", "step_10", "step_15", "step_20"]
    # each eval and checkpoint comes right after the step it belongs to
    order = [
        (type(e).__name__, getattr(e, "step", None))
        for e in log.events
        if isinstance(e, StepEnded | EvalEnded | CheckpointSaved)
    ]
    for i, (name, step_idx) in enumerate(order):
        if name != "StepEnded":
            assert order[i - 1][1] == step_idx or name == "CheckpointSaved", order


@pytest.mark.anyio
@KINDS
async def test_a_controlling_callback_stops_at_the_exact_step(kind: str, tmp_path: Path) -> None:
    ran: list[int] = []

    class StopAtSeven(ev.Callback):
        controls_loop = True

        def on_step_end(self, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            if i == 7:
                state.request_stop("seven")

    log = Log()
    loop = ev.TrainingLoop(
        make_step(kind, ran), num_steps=100, output_dir=tmp_path, callbacks=[StopAtSeven(), log]
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "stopped" and artifacts.stop_reason == "seven"
    assert ran == log.steps() == list(range(8))  # step 8 never started
    assert [e.step for e in log.events if isinstance(e, StopRequested)] == [7]


@pytest.mark.anyio
@KINDS
async def test_a_request_from_a_non_controlling_callback_is_honoured(
    kind: str, tmp_path: Path
) -> None:
    finish = threading.Event()
    ran: list[int] = []

    class Stops(ev.Callback):
        def on_step_end(self, state: ev.LoopState, i: int, b: Any, m: Any) -> None:
            if i == 3:
                state.request_checkpoint("asked")
                state.request_stop("enough")
                finish.set()

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        ran.append(step_idx)
        if step_idx >= 4:
            finish.wait(WAIT)  # the step after the request waits for it to be made
        return {}

    async def astep(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        ran.append(step_idx)
        if step_idx >= 4:
            while not finish.is_set():
                await anyio.sleep(0.001)
        return {}

    saved: list[str] = []
    loop = ev.TrainingLoop(
        step if kind == "def" else astep, num_steps=1000, output_dir=tmp_path,
        callbacks=[Stops()], checkpoint=lambda s, n: saved.append(n),
    )  # fmt: skip
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "stopped" and artifacts.stop_reason == "enough"
    assert 5 <= artifacts.steps_completed <= 6  # at the boundary after the request
    assert saved == ["asked"]  # the stop's step was saved: no "final" again


@pytest.mark.anyio
@KINDS
async def test_a_failed_step_ends_the_run_failed_with_its_traceback(
    kind: str, tmp_path: Path
) -> None:
    log = Log()
    loop = ev.TrainingLoop(
        make_step(kind, fail_at=5), num_steps=20, output_dir=tmp_path, callbacks=[log]
    )
    with anyio.fail_after(WAIT), pytest.raises(RuntimeError, match="nan at 5"):
        await loop.run()
    artifacts = loop.artifacts
    assert artifacts is not None and artifacts.status == "failed"
    assert artifacts.steps_completed == 5 and log.steps() == list(range(5))
    assert artifacts.error == "RuntimeError: nan at 5"
    assert artifacts.traceback is not None and "nan at" in artifacts.traceback


@pytest.mark.anyio
@KINDS
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
async def test_an_interrupt_from_the_step_runs_the_shutdown_then_leaves(
    kind: str, exc_type: type[BaseException], tmp_path: Path
) -> None:
    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 3:
            raise exc_type()
        return {}

    async def astep(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return step(state, step_idx)

    log = Log()
    loop = ev.TrainingLoop(
        step if kind == "def" else astep, num_steps=20, output_dir=tmp_path, callbacks=[log]
    )
    with anyio.fail_after(WAIT), pytest.raises(exc_type) as raised:
        await loop.run()
    assert type(raised.value) is exc_type
    assert loop.artifacts is not None and loop.artifacts.status == "cancelled"
    assert [type(e).__name__ for e in log.events][-1] == "TrainEnded"


@pytest.mark.anyio
@KINDS
async def test_cancelled_from_outside_mid_run(kind: str, tmp_path: Path) -> None:
    going = threading.Event()
    ran: list[int] = []

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        ran.append(step_idx)
        if step_idx == 10:
            going.set()
        return {}

    async def astep(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        step(state, step_idx)
        await anyio.lowlevel.checkpoint()
        return {}

    log = Log()
    loop = ev.TrainingLoop(
        step if kind == "def" else astep, num_steps=10**7, output_dir=tmp_path, callbacks=[log]
    )
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop.run)
            await anyio.to_thread.run_sync(going.wait, WAIT)
            tg.cancel_scope.cancel()
    artifacts = loop.artifacts
    assert artifacts is not None and artifacts.status == "cancelled"
    assert 11 <= artifacts.steps_completed < 10**7
    # the step in progress finished; every step that ran was published once, in order
    assert log.steps() == ran[: artifacts.steps_completed]
    assert type(log.events[-1]).__name__ == "TrainEnded"


@pytest.mark.anyio
async def test_a_def_step_runs_in_one_thread_started_with_the_callers_context(
    tmp_path: Path,
) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("caller's")
    seen: set[tuple[int, str]] = set()

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        seen.add((threading.get_ident(), var.get()))
        return {}

    loop = ev.TrainingLoop(step, num_steps=50, output_dir=tmp_path)
    with anyio.fail_after(WAIT):
        await loop.run()
    [(ident, value)] = seen
    assert ident != threading.get_ident() and value == "caller's"


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_sync_runs_a_def_step_on_the_calling_thread(backend: str, tmp_path: Path) -> None:
    local = threading.local()
    local.mode = "no_grad"  # what torch.no_grad() / torch.device(...) set: thread-local
    seen: list[tuple[bool, str | None]] = []

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        seen.append((threading.current_thread() is threading.main_thread(), local.mode))
        return {"loss": 1.0}

    log = Log()
    loop = ev.TrainingLoop(step, num_steps=30, output_dir=tmp_path, callbacks=[log])
    artifacts = loop.run_sync(backend=backend)
    assert artifacts.status == "completed" and log.steps() == list(range(30))
    assert seen == [(True, "no_grad")] * 30


def test_run_sync_works_where_an_event_loop_already_runs(tmp_path: Path) -> None:
    import asyncio

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {}

    async def notebook_cell() -> ev.LoopArtifacts:
        # a notebook cell: synchronous code called while an event loop runs here
        return ev.TrainingLoop(step, num_steps=5, output_dir=tmp_path).run_sync()

    assert asyncio.run(notebook_cell()).status == "completed"


SIGINT_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import evsys_async as ev
    from evsys_async._util.signals import Interrupted

    def step(state, step_idx):
        assert threading.current_thread() is threading.main_thread()
        if step_idx == 5:
            print("ready", flush=True)
        time.sleep(0.002)
        return {"loss": 1.0}

    loop = ev.TrainingLoop(step, num_steps=10**6, output_dir=sys.argv[1], run_key="r")
    try:
        loop.run_sync(backend=sys.argv[2])
    except Interrupted as exc:
        a = loop.artifacts
        print(a.status, a.steps_completed > 5, (a.run_dir / "manifest.json").exists(), flush=True)
        sys.exit(exc.exit_code)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_sync_ctrl_c_ends_after_the_current_step_through_the_shutdown(
    backend: str, tmp_path: Path
) -> None:
    script = tmp_path / "main.py"
    script.write_text(SIGINT_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 130, err
    assert out.strip() == "cancelled True True"
