"""The caller's framework context reaches the step (``loop/_context.py``).

Whichever thread runs the steps, the ``def`` evaluators and the ``def``
checkpoint function (``run()`` or ``run_sync()``, ``def`` or ``async def``
step), it runs with the caller's torch state captured at the call (grad
mode, inference mode, default device, autocast) and inside the loop's
``step_context``. Real torch (CPU), skipped where it is not installed, and a
stand-in thread-local for everything else, for each runner x step kind x
backend.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from tests.loop.devices import RUNNERS, WAIT, run, step_of

KINDS = pytest.mark.parametrize("kind", ["def", "async"])
BACKENDS = pytest.mark.parametrize("backend", ["asyncio", "trio"])
INSTALL = "torch is not installed: pip install torch==2.13.0 (the CPU build) to run it"


class Seen:
    """What the run's code saw, by where it ran: the step, a def evaluator, a def
    checkpoint function."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self.by_place: dict[str, set[Any]] = {}
        self.threads: dict[str, set[str]] = {}
        self.lock = threading.Lock()

    def record(self, place: str) -> None:
        value = self.probe()
        with self.lock:
            self.by_place.setdefault(place, set()).add(value)
            self.threads.setdefault(place, set()).add(threading.current_thread().name)

    def loop(self, kind: str, tmp_path: Path, **kwargs: Any) -> ev.TrainingLoop:
        seen = self

        class DefEval:
            name, run_every = "val", 3

            def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
                seen.record("evaluator")
                return {"acc": 1.0}

        def body(state: ev.LoopState, step_idx: int) -> dict[str, float]:
            self.record("step")
            return {"loss": 1.0}

        def checkpoint(state: ev.LoopState, name: str) -> None:
            self.record("checkpoint")

        return ev.TrainingLoop(
            step_of(kind, body), num_steps=6, output_dir=tmp_path, evaluators=[DefEval()],
            save_every=3, checkpoint=checkpoint, **kwargs,
        )  # fmt: skip


# -- step_context: anything thread-local ----------------------------------------------

LOCAL = threading.local()


class Mode:
    """A stand-in for a framework's thread-local mode, and the step_context setting it."""

    def __init__(self) -> None:
        self.entered: list[str] = []
        self.left: list[str] = []

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        previous = getattr(LOCAL, "mode", None)
        LOCAL.mode = "on"
        self.entered.append(threading.current_thread().name)
        try:
            yield
        finally:
            LOCAL.mode = previous
            self.left.append(threading.current_thread().name)


@pytest.mark.parametrize("runner", RUNNERS)
@KINDS
@BACKENDS
def test_step_context_is_entered_wherever_the_runs_code_runs(
    runner: str, kind: str, backend: str, tmp_path: Path
) -> None:
    mode = Mode()
    seen = Seen(lambda: getattr(LOCAL, "mode", None))
    artifacts = run(seen.loop(kind, tmp_path, step_context=mode), runner, backend)
    assert artifacts.status == "completed"
    assert seen.by_place == {"step": {"on"}, "evaluator": {"on"}, "checkpoint": {"on"}}
    # once in each thread, for the whole run, and left there
    assert sorted(mode.entered) == sorted(mode.left)
    assert len(mode.entered) == len(set(mode.entered))
    assert set().union(*seen.threads.values()) <= set(mode.entered)
    assert getattr(LOCAL, "mode", None) is None  # the caller's thread as it was


def test_a_step_context_must_be_a_function_that_makes_one() -> None:
    class Decorator:  # what torch.no_grad() is: a context manager that is also callable
        def __enter__(self) -> None: ...
        def __exit__(self, *exc: object) -> None: ...
        def __call__(self, fn: Any) -> Any:
            return fn

    step = step_of("def", lambda s, i: {})
    with pytest.raises(TypeError, match=r"got a context manager.*not the context manager"):
        ev.TrainingLoop(step, num_steps=1, step_context=contextlib.nullcontext())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must take no arguments"):
        ev.TrainingLoop(step, num_steps=1, step_context=Decorator())
    with pytest.raises(TypeError, match="zero-argument callable"):
        ev.TrainingLoop(step, num_steps=1, step_context="torch.no_grad")  # type: ignore[arg-type]


@pytest.mark.parametrize("runner", RUNNERS)
@BACKENDS
def test_a_step_context_that_makes_no_context_manager_fails_before_anything_starts(
    runner: str, backend: str, tmp_path: Path
) -> None:
    loop = ev.TrainingLoop(
        step_of("def", lambda s, i: {}), num_steps=3, output_dir=tmp_path,
        step_context=lambda: 42,  # type: ignore[arg-type,return-value]
    )  # fmt: skip
    with pytest.raises(TypeError, match=r"must return a context manager.*got 42") as raised:
        run(loop, runner, backend)
    assert "while entering TrainingLoop(step_context=...) in thread" in str(raised.value.__notes__)
    assert loop.artifacts is None and not any(tmp_path.iterdir())  # nothing was claimed


@pytest.mark.anyio
async def test_a_step_context_failing_in_the_step_thread_fails_the_run_naming_it(
    tmp_path: Path,
) -> None:
    @contextlib.contextmanager
    def only_here() -> Iterator[None]:
        if threading.current_thread().name.startswith("evsys-step"):
            raise RuntimeError("no device in this thread")
        yield

    loop = ev.TrainingLoop(
        step_of("def", lambda s, i: {}), num_steps=3, output_dir=tmp_path, step_context=only_here
    )
    with anyio.fail_after(WAIT), pytest.raises(RuntimeError, match="no device") as raised:
        await loop.run()
    assert "in thread 'evsys-step:run'" in str(raised.value.__notes__)
    assert loop.artifacts is not None and loop.artifacts.status == "failed"
    assert loop.artifacts.steps_completed == 0


@pytest.mark.anyio
async def test_a_step_context_whose_exit_raises_is_said_and_the_result_stands(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    @contextlib.contextmanager
    def leaves_badly() -> Iterator[None]:
        yield
        raise OSError("stream already closed")

    loop = ev.TrainingLoop(
        step_of("def", lambda s, i: {}), num_steps=3, output_dir=tmp_path,
        step_context=leaves_badly,
    )  # fmt: skip
    with anyio.fail_after(WAIT):
        assert (await loop.run()).status == "completed"
    assert "step_context raised when it was left" in warnings_log.text


# -- torch ------------------------------------------------------------------------------


def torch_state() -> tuple[Any, ...]:
    import torch

    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.get_default_device().type,
        torch.empty(1).device.type,
        torch.is_autocast_enabled("cpu"),
        torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None,
    )


@pytest.mark.parametrize("runner", RUNNERS)
@KINDS
@BACKENDS
def test_torch_grad_mode_default_device_and_autocast_reach_the_step(
    runner: str, kind: str, backend: str, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch", reason=INSTALL)
    seen = Seen(torch_state)
    before = torch_state()
    with torch.no_grad(), torch.device("meta"), torch.autocast("cpu", dtype=torch.bfloat16):
        artifacts = run(seen.loop(kind, tmp_path), runner, backend)
    assert artifacts.status == "completed"
    applied = (False, False, "meta", "meta", True, torch.bfloat16)
    assert seen.by_place == {"step": {applied}, "evaluator": {applied}, "checkpoint": {applied}}
    assert torch_state() == before  # the caller's thread as it was


@pytest.mark.parametrize("runner", RUNNERS)
@KINDS
@BACKENDS
def test_torch_inference_mode_and_set_defaults_reach_the_step(
    runner: str, kind: str, backend: str, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch", reason=INSTALL)
    seen = Seen(lambda: (*torch_state(), torch.ones(1).is_inference()))
    torch.set_default_device("meta")
    try:
        with torch.inference_mode():
            artifacts = run(seen.loop(kind, tmp_path), runner, backend)
    finally:
        torch.set_default_device(None)
    assert artifacts.status == "completed"
    applied = (False, True, "meta", "meta", False, None, True)
    assert seen.by_place == {"step": {applied}, "evaluator": {applied}, "checkpoint": {applied}}


@pytest.mark.parametrize("runner", RUNNERS)
@KINDS
def test_with_torch_state_untouched_the_step_gets_torchs_defaults(
    runner: str, kind: str, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch", reason=INSTALL)
    seen = Seen(torch_state)
    assert run(seen.loop(kind, tmp_path), runner, "asyncio").status == "completed"
    default = (True, False, "cpu", "cpu", False, None)
    assert seen.by_place == {"step": {default}, "evaluator": {default}, "checkpoint": {default}}
    assert torch.is_grad_enabled()


NO_TORCH = textwrap.dedent(
    """
    import sys
    import evsys_async as ev

    def step(state, step_idx):
        return {"loss": 1.0}

    for runner in ("run_sync", "run"):
        loop = ev.TrainingLoop(step, num_steps=3, output_dir=sys.argv[1], run_key=runner)
        if runner == "run":
            import anyio
            anyio.run(loop.run)
        else:
            loop.run_sync()
    print("torch" in sys.modules)
    """
)


@pytest.mark.slow
def test_a_run_never_imports_torch(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    assert out.stdout.strip() == "False", out.stderr


def guide_blocks() -> list[str]:
    guide = (Path(__file__).resolve().parents[2] / "docs" / "guide.md").read_text()
    section = guide.split("## Framework state and devices", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("index", [0, 1])
def test_the_guides_examples_run(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    block = guide_blocks()[index]
    if "import torch" in block:
        pytest.importorskip("torch", reason=INSTALL)
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(compile(block, f"docs/guide.md block {index}", "exec"), scope)
    artifacts = scope["artifacts"]
    assert artifacts.status == "completed" and artifacts.steps_completed == scope["loop"].num_steps
