"""TrainingLoop: callbacks as subscribers, stop, evaluators, checkpoints, endings.

Isolation and "nothing lost" are proven by counting, on asyncio and trio.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.events import EvalFailed, StepEnded, StopRequested, TrainEnded

pytestmark = pytest.mark.anyio

WAIT = 30.0  # the fail_after around every wait: generous, never reached when all is well


class Recorder(ev.Callback):
    """Counts every loop-scope hook, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.ended: ev.LoopArtifacts | None = None
        self.threads: set[int] = set()

    def on_train_start(self, state: ev.LoopState) -> None:
        self.calls.append(("start", state.num_steps))

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self.threads.add(threading.get_ident())
        self.calls.append(("step", step_idx))

    def on_eval(self, state: ev.LoopState, step_idx: int, eval_name: str, metrics: Any) -> None:
        self.calls.append(("eval", (step_idx, eval_name, dict(metrics))))

    def on_checkpoint(self, state: ev.LoopState, row: dict[str, Any]) -> None:
        self.calls.append(("ckpt", row["name"]))

    def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
        self.ended = artifacts
        self.calls.append(("end", artifacts.status))

    def steps(self) -> list[int]:
        return [v for k, v in self.calls if k == "step"]


class AsyncRecorder(ev.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.status: str | None = None

    async def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
        self.steps.append(step_idx)

    async def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
        self.status = artifacts.status


class Acc:
    """An evaluator whose accuracy rises with the step (the original's example shape)."""

    def __init__(self, name: str = "val", run_every: int = 5) -> None:
        self.name = name
        self.run_every = run_every
        self.calls: list[int] = []

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        self.calls.append(step_idx)
        return {"acc": step_idx / 100}


async def loss_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    return {"loss": 1.0 / (step_idx + 1)}


async def test_original_example_every_hook_in_order(tmp_path: Path) -> None:
    rec, arec, acc = Recorder(), AsyncRecorder(), Acc(run_every=5)
    loop = ev.TrainingLoop(
        loss_step,
        num_steps=20,
        output_dir=tmp_path,
        run_key="seed",
        evaluators=[acc],
        callbacks=[rec, arec],
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    assert artifacts.steps_completed == 20
    assert rec.steps() == list(range(20))
    assert arec.steps == list(range(20))
    assert acc.calls == [4, 9, 14, 19]
    evals = [v for k, v in rec.calls if k == "eval"]
    assert evals == [(s, "val", {"acc": s / 100}) for s in (4, 9, 14, 19)]
    # the eval of step k comes after step k's event and before step k+1's
    assert rec.calls.index(("eval", evals[0])) == rec.calls.index(("step", 4)) + 1
    assert rec.calls[0] == ("start", 20)
    assert rec.calls[-1] == ("end", "completed")
    assert arec.status == "completed"
    assert artifacts.run_dir == tmp_path / "seed"
    assert artifacts.callback_report is not None
    assert artifacts.callback_report["Recorder"].delivered == 1 + 20 + 4 + 1
    assert artifacts.callback_report["Recorder"].pending == 0
    # on_train_end sees the artifacts before the drain: the report is still empty
    assert rec.ended is not None and rec.ended.callback_report == {}
    manifest = json.loads((tmp_path / "seed" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["steps_completed"] == 20
    assert artifacts.train_seconds > 0 and artifacts.drain_seconds > 0


async def test_blocked_def_callback_never_stalls_the_loop(tmp_path: Path) -> None:
    """A callback blocked on a threading.Event while every step completes."""
    release = threading.Event()
    n = 50

    class Blocked(ev.Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
            release.wait(30)
            self.steps.append(step_idx)

    blocked, sibling = Blocked(), AsyncRecorder()
    seen_when_last_step_ran: list[int] = []

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == n - 1:
            # every earlier step finished while the callback had handled nothing
            seen_when_last_step_ran.append(len(blocked.steps))
            release.set()
        return {"loss": 1.0}

    loop = ev.TrainingLoop(step, num_steps=n, output_dir=tmp_path, callbacks=[blocked, sibling])
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert seen_when_last_step_ran == [0]
    assert blocked.steps == list(range(n))  # nothing lost, in order, after the release
    assert sibling.steps == list(range(n))
    assert artifacts.status == "completed"


async def test_failing_callback_is_isolated_and_reported(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    class Boom(ev.Callback):
        async def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            raise RuntimeError(f"boom at {step_idx}")

    class Failures(ev.Callback):
        def __init__(self) -> None:
            self.events: list[ev.events.CallbackFailed] = []

        async def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
            if isinstance(event, ev.events.CallbackFailed):
                self.events.append(event)

    rec, failures = Recorder(), Failures()
    loop = ev.TrainingLoop(
        loss_step, num_steps=10, output_dir=tmp_path, callbacks=[Boom(), rec, failures]
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert rec.steps() == list(range(10))
    assert artifacts.callback_report is not None
    assert artifacts.callback_report["Boom"].failed == 10
    assert len(failures.events) == 10
    assert {f.hook for f in failures.events} == {"on_step_end"}
    text = warnings_log.text
    assert "callback failed: callback=Boom hook=on_step_end" in text
    assert "RuntimeError: boom at 3" in text and "Traceback" in text


async def test_early_stop_by_controls_loop_callback_is_exact(tmp_path: Path) -> None:
    """A stop decided on the eval after step k is honoured before step k+1."""

    class StopAtNine(ev.Callback):
        controls_loop = True

        async def on_eval(self, state: ev.LoopState, step_idx: int, name: str, m: Any) -> None:
            await anyio.lowlevel.checkpoint()  # the loop must wait for this
            if step_idx == 9:
                state.request_stop("acc plateaued")

    stepped: list[int] = []

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        stepped.append(step_idx)
        return {"loss": 1.0}

    rec = Recorder()
    loop = ev.TrainingLoop(
        step,
        num_steps=100,
        output_dir=tmp_path,
        evaluators=[Acc(run_every=5)],
        callbacks=[StopAtNine(), rec],
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert stepped == list(range(10))
    assert artifacts.status == "stopped"
    assert artifacts.stop_reason == "acc plateaued"
    assert artifacts.steps_completed == 10
    assert rec.calls[-1] == ("end", "stopped")


async def test_stop_from_any_hook_ends_at_a_step_boundary(tmp_path: Path) -> None:
    class Stopper(ev.Callback):
        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            if step_idx == 3:
                state.request_stop("enough", failed=True)

    class Events(ev.Callback):
        def __init__(self) -> None:
            self.stops: list[StopRequested] = []

        def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
            if isinstance(event, StopRequested):
                self.stops.append(event)

    events = Events()
    release = anyio.Event()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if state.stop_requested:
            release.set()
        await anyio.lowlevel.checkpoint()
        return {}

    loop = ev.TrainingLoop(
        step, num_steps=10_000, output_dir=tmp_path, callbacks=[Stopper(), events]
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "failed"  # request_stop(failed=True)
    assert artifacts.stop_reason == "enough"
    assert 4 <= artifacts.steps_completed < 10_000
    assert [(s.reason, s.source) for s in events.stops] == [("enough", "Stopper")]


async def test_step_that_raises_is_reraised_after_the_drain(tmp_path: Path) -> None:
    rec, arec = Recorder(), AsyncRecorder()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 7:
            raise ValueError("nan loss")
        return {"loss": 1.0}

    loop = ev.TrainingLoop(step, num_steps=20, output_dir=tmp_path, callbacks=[rec, arec])
    with anyio.fail_after(30), pytest.raises(ValueError, match="nan loss"):
        await loop.run()
    assert rec.steps() == list(range(7))
    assert rec.calls[-1] == ("end", "failed")
    assert arec.status == "failed"
    artifacts = loop.artifacts
    assert artifacts is not None and artifacts.status == "failed"
    assert artifacts.error == "ValueError: nan loss"
    assert set(artifacts.callback_report) == {"Recorder", "AsyncRecorder"}  # shutdown ran first


async def test_outer_cancellation_runs_the_shutdown_then_propagates(tmp_path: Path) -> None:
    rec, arec = Recorder(), AsyncRecorder()
    slow_release = threading.Event()

    class SlowDef(ev.Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            slow_release.wait(30)
            self.steps.append(step_idx)

    slow = SlowDef()
    with anyio.CancelScope() as scope:

        async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
            if step_idx == 12:
                slow_release.set()
                scope.cancel()
                await anyio.sleep_forever()
            return {"loss": 1.0}

        loop = ev.TrainingLoop(
            step, num_steps=1000, output_dir=tmp_path, callbacks=[rec, arec, slow]
        )
        with anyio.fail_after(30):
            await loop.run()
        pytest.fail("run() must propagate the cancellation")  # pragma: no cover
    assert scope.cancelled_caught
    assert rec.steps() == list(range(12))
    assert slow.steps == list(range(12))  # the drain waited for the slow callback
    assert arec.steps == list(range(12))
    assert rec.calls[-1] == ("end", "cancelled")
    assert arec.status == "cancelled"
    assert loop.artifacts is not None and loop.artifacts.status == "cancelled"


async def test_evaluators_run_concurrently_and_failures_are_isolated(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    a_started, b_started = anyio.Event(), anyio.Event()

    class Waits:
        def __init__(self, name: str, mine: anyio.Event, other: anyio.Event) -> None:
            self.name, self.run_every, self.mine, self.other = name, 2, mine, other

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            self.mine.set()
            await self.other.wait()  # deadlocks unless both run at once
            return {"x": 1.0}

    class Fails:
        name, run_every = "broken", 2

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            raise ConnectionError("eval server down")

    class Hangs:
        name, run_every = "hangs", 4

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            await anyio.sleep_forever()
            raise AssertionError  # pragma: no cover

    class Failed(ev.Callback):
        def __init__(self) -> None:
            self.events: list[EvalFailed] = []

        async def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
            if isinstance(event, EvalFailed):
                self.events.append(event)

    failed, rec = Failed(), Recorder()
    loop = ev.TrainingLoop(
        loss_step,
        num_steps=4,
        output_dir=tmp_path,
        evaluators=[
            Waits("a", a_started, b_started),
            Waits("b", b_started, a_started),
            Fails(),
            Hangs(),
        ],
        callbacks=[failed, rec],
        eval_timeout=0.2,
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    assert [(e.step, e.eval_name) for e in failed.events] == [
        (1, "broken"),
        (3, "broken"),
        (3, "hangs"),
    ]
    assert failed.events[-1].error == "timeout after 0.2s"
    assert "ConnectionError: eval server down" in failed.events[0].error
    assert [v[:2] for k, v in rec.calls if k == "eval"] == [(1, "a"), (1, "b"), (3, "a"), (3, "b")]
    assert "evaluator failed" in warnings_log.text


async def test_background_evals_let_training_go_on(tmp_path: Path) -> None:
    release = anyio.Event()
    progressed: list[int] = []

    class Slow:
        name, run_every = "slow", 3

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            if step_idx == 2:
                await release.wait()  # released by a later step: training went on
            return {"seen_model": float(state.model)}

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        progressed.append(step_idx)
        if step_idx == 6:
            release.set()
        return {}

    rec = Recorder()
    loop = ev.TrainingLoop(
        step,
        num_steps=9,
        output_dir=tmp_path,
        evaluators=[Slow()],
        callbacks=[rec],
        eval_mode="background",
        max_evals_in_flight=4,
        snapshot=lambda state: state.step * 10,
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert progressed == list(range(9))
    evals = sorted(v for k, v in rec.calls if k == "eval")
    # each EvalEnded carries the step it evaluated and the snapshot taken then
    assert evals == [(2, "slow", {"seen_model": 20.0}), (5, "slow", {"seen_model": 50.0}),
                     (8, "slow", {"seen_model": 80.0})]  # fmt: skip
    assert rec.calls[-1] == ("end", "completed")
    assert artifacts.status == "completed"


async def test_checkpoints_rows_and_events(tmp_path: Path) -> None:
    saved: list[tuple[int, str]] = []

    def checkpoint(state: ev.LoopState, name: str) -> str:
        saved.append((state.step, name))
        path = state.run_dir / f"{name}.ckpt"
        path.write_text("weights")
        return str(path)

    rec = Recorder()
    loop = ev.TrainingLoop(
        loss_step,
        num_steps=10,
        output_dir=tmp_path,
        run_key="ck",
        save_every=4,
        checkpoint=checkpoint,
        callbacks=[rec],
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert [n for _, n in saved] == ["step_4", "step_8", "final"]
    rows = [
        json.loads(line)
        for line in (tmp_path / "ck" / "checkpoints.jsonl").read_text().splitlines()
    ]
    assert [r["name"] for r in rows] == ["step_4", "step_8", "final"]
    assert rows[0]["path"].endswith("step_4.ckpt")
    assert [r["name"] for r in artifacts.checkpoints] == ["step_4", "step_8", "final"]
    assert [v for k, v in rec.calls if k == "ckpt"] == ["step_4", "step_8", "final"]


async def test_def_step_runs_in_one_dedicated_thread(tmp_path: Path) -> None:
    threads: list[int] = []

    def step(state: ev.LoopState, step_idx: int) -> ev.StepOutput:
        threads.append(threading.get_ident())
        return ev.StepOutput(metrics={"loss": 1.0}, batch=[step_idx])

    class Batches(ev.Callback):
        wants_batch = True

        def __init__(self) -> None:
            self.batches: list[Any] = []

        async def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
            self.batches.append(batch)

    batches = Batches()
    loop = ev.TrainingLoop(step, num_steps=5, output_dir=tmp_path, callbacks=[batches])
    with anyio.fail_after(30):
        await loop.run()
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
    # only the newest batch is held: each handled step got its own or None
    assert all(b is None or b == [i] for i, b in enumerate(batches.batches))
    assert batches.batches[-1] == [4]


async def test_callback_errors_raise_ends_the_run_before_the_next_step(tmp_path: Path) -> None:
    class Boom(ev.Callback):
        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            if step_idx == 2:
                raise KeyError("bad key")

    stepped: list[int] = []

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        stepped.append(step_idx)
        return {}

    rec = Recorder()
    loop = ev.TrainingLoop(
        step, num_steps=50, output_dir=tmp_path, callbacks=[Boom(), rec], callback_errors="raise"
    )
    with anyio.fail_after(30), pytest.raises(KeyError, match="bad key"):
        await loop.run()
    assert stepped == [0, 1, 2]
    assert loop.artifacts is not None and loop.artifacts.status == "failed"
    assert rec.calls[-1] == ("end", "failed")


async def test_control_timeout_is_counted_and_the_loop_goes_on(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    gate = anyio.Event()

    class Stuck(ev.Callback):
        controls_loop = True

        async def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            if step_idx == 0:
                await gate.wait()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 2:
            gate.set()
        return {}

    loop = ev.TrainingLoop(
        step, num_steps=3, output_dir=tmp_path, callbacks=[Stuck()], control_timeout=0.05
    )
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.callback_report is not None
    assert artifacts.callback_report["Stuck"].control_timeouts >= 1
    assert "control callback did not keep up" in warnings_log.text


async def test_shared_bus_stays_open_and_run_ends_only_its_subscriptions(tmp_path: Path) -> None:
    seen: list[str] = []
    async with ev.EventBus() as bus:

        async def watcher(event: ev.Event) -> None:
            seen.append(type(event).__name__)

        bus.subscribe(watcher, events=(StepEnded, TrainEnded))
        rec = Recorder()
        loop = ev.TrainingLoop(
            loss_step, num_steps=3, output_dir=tmp_path, bus=bus, callbacks=[rec]
        )
        with anyio.fail_after(30):
            await loop.run()
        assert rec.calls[-1] == ("end", "completed")
        assert bus.stats()["Recorder"].delivered == 1 + 3 + 1
        bus.publish(StepEnded(step=99, num_steps=3))  # the caller's bus is still open
        await bus.drain(5)
        assert seen == ["StepEnded"] * 3 + ["TrainEnded", "StepEnded"]
        assert len(rec.steps()) == 3  # the run's callback is unsubscribed


async def test_resume_restores_callback_state(tmp_path: Path) -> None:
    class Counter(ev.Callback):
        def __init__(self) -> None:
            self.count = 0

        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            self.count += 1

        def state_dict(self) -> dict[str, int]:
            return {"count": self.count}

        def load_state_dict(self, d: dict[str, int]) -> None:
            self.count = d["count"]

    def checkpoint(state: ev.LoopState, name: str) -> None:
        return None

    first = Counter()
    loop = ev.TrainingLoop(
        loss_step, num_steps=6, output_dir=tmp_path, checkpoint=checkpoint, save_every=3,
        callbacks=[first],
    )  # fmt: skip
    with anyio.fail_after(30):
        await loop.run()
    assert first.count == 6
    second = Counter()
    loop2 = ev.TrainingLoop(
        loss_step, num_steps=10, output_dir=tmp_path, checkpoint=checkpoint, callbacks=[second]
    )
    with anyio.fail_after(30):
        await loop2.run(start_step=6)
    assert second.count == 6 + 4


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"num_steps": 0}, "num_steps must be an int >= 1"),
        ({"num_steps": 5, "save_every": -1}, "save_every must be >= 0"),
        ({"num_steps": 5, "eval_mode": "later"}, "eval_mode must be 'inline' or 'background'"),
        ({"num_steps": 5, "drain_timeout": 0}, "drain_timeout must be > 0"),
    ],
)
def test_bad_arguments_name_the_allowed_range(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ev.TrainingLoop(loss_step, **kwargs)


async def test_start_step_out_of_range(tmp_path: Path) -> None:
    loop = ev.TrainingLoop(loss_step, num_steps=5, output_dir=tmp_path)
    with anyio.fail_after(WAIT):
        with pytest.raises(ValueError, match=r"start_step must be in \[0, 4\]"):
            await loop.run(start_step=5)


async def test_bad_hook_signature_is_caught_before_the_run(tmp_path: Path) -> None:
    class Wrong(ev.Callback):
        def on_step_end(self, state: ev.LoopState) -> None:  # type: ignore[override]
            pass

    loop = ev.TrainingLoop(loss_step, num_steps=5, output_dir=tmp_path, callbacks=[Wrong()])
    with anyio.fail_after(WAIT):
        with pytest.raises(
            TypeError, match=r"Wrong\.on_step_end.*cannot take the hook's arguments"
        ):
            await loop.run()


async def test_non_numeric_metric_fails_the_step_clearly(tmp_path: Path) -> None:
    async def step(state: ev.LoopState, step_idx: int) -> dict[str, Any]:
        return {"loss": "low"}

    loop = ev.TrainingLoop(step, num_steps=5, output_dir=tmp_path)
    with anyio.fail_after(WAIT):
        with pytest.raises(TypeError, match="metric 'loss' = 'low', which is not a number"):
            await loop.run()


async def test_callback_stuck_past_the_deadline_is_named_and_torn_down_later(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    """One drain_timeout bounds the shutdown; teardown runs when the call returns."""
    release = threading.Event()
    torn_down = threading.Event()
    teardown_thread: list[int] = []

    class Hung(ev.Callback):
        def __init__(self) -> None:
            self.handled: list[int] = []
            self.thread = 0

        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            self.thread = threading.get_ident()
            if step_idx == 1:
                release.wait(60)
            self.handled.append(step_idx)

        def teardown(self, state: ev.LoopState) -> None:
            teardown_thread.append(threading.get_ident())
            torn_down.set()

    hung, rec = Hung(), Recorder()
    loop = ev.TrainingLoop(
        loss_step, num_steps=5, output_dir=tmp_path, callbacks=[hung, rec], drain_timeout=0.5
    )
    with anyio.fail_after(20):
        artifacts = await loop.run()
    assert rec.calls[-1] == ("end", "completed")  # siblings complete
    report = artifacts.callback_report
    assert report is not None
    assert report["Hung"].stuck
    assert not report["Recorder"].stuck
    assert "callbacks left behind" in warnings_log.text
    assert not torn_down.is_set()
    release.set()
    with anyio.fail_after(20):
        while not torn_down.is_set():
            await anyio.sleep(0.01)
    assert teardown_thread == [hung.thread]  # in its own thread, after the hung call


async def test_state_dict_runs_in_the_callbacks_own_thread(tmp_path: Path) -> None:
    """A callback tied to its thread (sqlite3, a GUI) is asked for its state there."""
    threads: dict[str, set[int]] = {"hook": set(), "state_dict": set()}

    class Stateful(ev.Callback):
        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            threads["hook"].add(threading.get_ident())

        def state_dict(self) -> dict[str, int]:
            threads["state_dict"].add(threading.get_ident())
            return {"n": 1}

    loop = ev.TrainingLoop(
        loss_step,
        num_steps=4,
        output_dir=tmp_path,
        callbacks=[Stateful()],
        checkpoint=lambda state, name: None,
        save_every=2,
    )
    with anyio.fail_after(30):
        await loop.run()
    assert len(threads["hook"]) == 1
    assert threads["state_dict"] == threads["hook"]
    saved = json.loads((tmp_path / "run" / "callbacks_state.json").read_text())  # no key: "run"
    assert saved == {"Stateful": {"n": 1}}


async def test_raise_mode_failure_in_on_train_start_runs_no_step(tmp_path: Path) -> None:
    stepped: list[int] = []

    class Boom(ev.Callback):
        def on_train_start(self, state: ev.LoopState) -> None:
            raise RuntimeError("cannot open the log")

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        stepped.append(step_idx)
        return {}

    loop = ev.TrainingLoop(
        step, num_steps=5, output_dir=tmp_path, callbacks=[Boom()], callback_errors="raise"
    )
    with anyio.fail_after(30), pytest.raises(RuntimeError, match="cannot open the log"):
        await loop.run()
    assert stepped == []
    assert loop.artifacts is not None
    assert loop.artifacts.status == "failed"


async def test_run_on_a_shared_bus_does_not_wait_for_other_runs(tmp_path: Path) -> None:
    """A run's shutdown waits for its own callbacks only, not for another run's."""
    release = threading.Event()
    other_handled: list[int] = []
    async with ev.EventBus() as bus:

        def slow_other_run(event: ev.Event) -> None:
            release.wait(30)  # held until this run has returned
            other_handled.append(1)

        bus.subscribe(slow_other_run, events=(StepEnded,), run_key="other")
        bus.publish(StepEnded(step=0, num_steps=1, run_key="other"))
        rec = Recorder()
        loop = ev.TrainingLoop(
            loss_step, num_steps=3, output_dir=tmp_path, run_key="mine", bus=bus, callbacks=[rec]
        )
        with anyio.fail_after(20):
            artifacts = await loop.run()
        assert other_handled == []  # it returned while the other run's callback was held
        assert rec.steps() == [0, 1, 2]
        assert artifacts.callback_report is not None
        assert artifacts.callback_report["Recorder"].pending == 0
        release.set()


async def test_in_flight_background_evals_count_in_the_one_shutdown_deadline(
    tmp_path: Path,
) -> None:
    class Hangs:
        name, run_every = "hangs", 1

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            await anyio.sleep_forever()
            raise AssertionError  # pragma: no cover

    loop = ev.TrainingLoop(
        loss_step,
        num_steps=1,
        output_dir=tmp_path,
        evaluators=[Hangs()],
        eval_mode="background",
        drain_timeout=0.5,
    )
    with anyio.fail_after(20):
        artifacts = await loop.run()
    # waiting for the eval is part of the shutdown: it shows in drain_seconds
    assert artifacts.drain_seconds >= 0.45
    assert artifacts.status == "completed"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_asyncio_cancels_do_not_skip_the_shutdown(tmp_path: Path) -> None:
    """uvicorn-style task.cancel(), twice, while a def callback is behind."""
    import asyncio

    release = threading.Event()

    class Slow(ev.Callback):
        def __init__(self) -> None:
            self.steps: list[int] = []
            self.torn_down = False

        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            release.wait(30)
            self.steps.append(step_idx)

        def teardown(self, state: ev.LoopState) -> None:
            self.torn_down = True

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        await asyncio.sleep(0)
        return {}

    with anyio.fail_after(WAIT):
        for shared in (False, True):
            slow = Slow()
            release.clear()
            async with ev.EventBus() as bus:
                loop = ev.TrainingLoop(
                    step, num_steps=10**6, output_dir=tmp_path, callbacks=[slow],
                    bus=bus if shared else None,
                )  # fmt: skip
                task = asyncio.ensure_future(loop.run())
                while loop.artifacts is None or loop.artifacts.steps_completed < 20:
                    await asyncio.sleep(0)
                task.cancel()
                while not (loop.state and loop.state.artifacts):  # the shutdown has begun
                    await asyncio.sleep(0)
                task.cancel()  # a second one, inside the shielded shutdown
                release.set()
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, 30)
            assert loop.artifacts is not None
            assert loop.artifacts.status == "cancelled"
            assert slow.steps == list(range(loop.artifacts.steps_completed))
            assert slow.torn_down
            assert loop.artifacts.callback_report is not None


# -- run directories: every run is a new run ------------------------------------------------


async def test_each_run_claims_a_new_dir_unless_asked_to_reuse_it(tmp_path: Path) -> None:
    class KeySeen(ev.Callback):
        key = ""

        def on_envelope(self, state: ev.LoopState, envelope: ev.Envelope) -> None:
            if isinstance(envelope.event, ev.events.TrainStarted):
                self.key = envelope.event.run_key

    keys = []
    with anyio.fail_after(WAIT):
        for _ in range(3):
            seen = KeySeen()
            loop = ev.TrainingLoop(
                loss_step, num_steps=2, output_dir=tmp_path, run_key="demo", callbacks=[seen]
            )
            artifacts = await loop.run()
            keys.append(loop.run_key)
            assert artifacts.run_dir == tmp_path / loop.run_key
            assert seen.key == loop.run_key  # the claimed key is the run key in events too
        assert keys == ["demo", "demo-1", "demo-2"]
        (tmp_path / "demo" / "mine.txt").write_text("an earlier run's file")
        loop = ev.TrainingLoop(
            loss_step, num_steps=2, output_dir=tmp_path, run_key="demo", overwrite=True
        )
        await loop.run()
        assert loop.run_key == "demo" and not (tmp_path / "demo" / "mine.txt").exists()  # afresh
        # no key: the config's name, else "run"
        loop = ev.TrainingLoop(
            loss_step, num_steps=1, output_dir=tmp_path, config={"name": "exp", "lr": 0.1}
        )
        assert (await loop.run()).run_dir == tmp_path / "exp"
        assert (
            await ev.TrainingLoop(loss_step, num_steps=1, output_dir=tmp_path).run()
        ).run_dir == tmp_path / "run"


@pytest.mark.parametrize("key", ["../x", "{tmp}/abs/x", "a/../../x", ".."])
def test_a_run_key_that_escapes_output_dir_is_refused(tmp_path: Path, key: str) -> None:
    key = key.format(tmp=tmp_path)  # an absolute path, inside tmp_path should it be written
    loop = ev.TrainingLoop(loss_step, num_steps=1, output_dir=tmp_path / "out", run_key=key)
    with pytest.raises(
        ValueError,
        match=r"would put the run's files outside output_dir .* a run key is a name inside it",
    ):
        loop.run_sync()
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()


async def test_resume_writes_each_step_once(tmp_path: Path) -> None:
    """25 steps, then a resume from step 20 to 30: rows 20-24 are not duplicated."""

    def checkpoint(state: ev.LoopState, name: str) -> None:
        return None

    def loop() -> ev.TrainingLoop:
        return ev.TrainingLoop(
            loss_step,
            num_steps=30,
            output_dir=tmp_path,
            run_key="r",
            evaluators=[Acc()],
            callbacks=ev.build_callbacks(
                [
                    {"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}},
                    {"kind": "local_logger", "params": {"print_every": 0}},
                ]
            ),
            checkpoint=checkpoint,
            save_every=10,
        )

    with anyio.fail_after(WAIT):
        await loop().run(num_steps=25)
        resumed = loop()
        await resumed.run(start_step=20)
    assert resumed.run_key == "r"  # a resume reuses its dir
    run_dir = tmp_path / "r"
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text())))
    train = [int(r["step"]) for r in rows if r["loss"]]
    assert train == list(range(30))
    assert [int(r["step"]) for r in rows if r["val/acc"]] == [4, 9, 14, 19, 24, 29]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["split"] == "train"] == list(range(30))
    assert [x["step"] for x in lines if x["split"] == "val"] == [4, 9, 14, 19, 24, 29]
    checkpoints = [json.loads(x) for x in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
    assert [(c["name"], c["step"]) for c in checkpoints] == [
        ("step_10", 9),
        ("step_20", 19),
        ("step_30", 29),
        ("final", 29),
    ]


def test_config_is_the_runs_hyperparameters_and_contradictions_are_refused(tmp_path: Path) -> None:
    seen = {}

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        seen.update(state.ctx.run_config)
        return {"loss": 1.0}

    ev.TrainingLoop(step, num_steps=1, output_dir=tmp_path, config={"lr": 0.5}).run_sync()
    assert seen == {"lr": 0.5}
    ctx = ev.LogContext(output_dir=tmp_path / "a", run_key="k", run_config={"lr": 0.1})
    with pytest.raises(ValueError, match=r"output_dir='.*b' contradicts ctx.output_dir='.*a'"):
        ev.TrainingLoop(step, num_steps=1, output_dir=tmp_path / "b", ctx=ctx)
    with pytest.raises(ValueError, match=r"run_key='other' contradicts ctx\.run_key='k'"):
        ev.TrainingLoop(step, num_steps=1, run_key="other", ctx=ctx)
    with pytest.raises(ValueError, match=r"config= and ctx\.run_config hold different"):
        ev.TrainingLoop(step, num_steps=1, config={"lr": 0.2}, ctx=ctx)
    with pytest.raises(TypeError, match="config must be a mapping"):
        ev.TrainingLoop(step, num_steps=1, config=[("lr", 0.2)])  # type: ignore[arg-type]
    loop = ev.TrainingLoop(step, num_steps=1, ctx=ctx)  # the ctx's output_dir and key
    assert loop.run_sync().run_dir == tmp_path / "a" / "k"


async def test_an_eval_timeout_is_one_line_without_a_traceback(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    class Hangs:
        name, run_every = "hangs", 2

        async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
            await anyio.Event().wait()  # never set: only the timeout ends it
            return {}

    loop = ev.TrainingLoop(
        loss_step, num_steps=2, output_dir=tmp_path, evaluators=[Hangs()], eval_timeout=0.05
    )
    with anyio.fail_after(30):
        assert (await loop.run()).status == "completed"
    [record] = [r for r in warnings_log.records if "evaluator failed" in r.getMessage()]
    assert "error=timeout after 0.05s" in record.getMessage()
    assert record.exc_info is None and "Traceback" not in warnings_log.text
    assert "CancelledError" not in warnings_log.text and "Cancelled" not in warnings_log.text


@pytest.mark.parametrize(
    ("where", "given", "words"),
    [
        ("callbacks", ev.Callback, "callbacks[0] is the class Callback, not an instance"),
        ("callbacks", "csv_metrics", "ev.build_callbacks"),
        ("callbacks", {"kind": "csv_metrics"}, "a config spec"),
        ("evaluators", Acc, "evaluators[0] is the class Acc, not an instance"),
    ],
)
def test_a_class_or_a_spec_where_an_instance_belongs_is_refused(
    where: str, given: Any, words: str, tmp_path: Path
) -> None:
    with pytest.raises(TypeError, match=re.escape(words)):
        ev.TrainingLoop(loss_step, num_steps=2, output_dir=tmp_path, **{where: [given]})
