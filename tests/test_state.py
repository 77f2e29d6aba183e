"""What a run shares with its callbacks (``state.py``): LoopState, LogContext, StepOutput,
LoopArtifacts, CallbackHealth.

``LoopState`` is live: hooks get the object itself, and its requests —
``request_stop``, ``request_checkpoint``, ``request_eval``, ``publish`` — are
safe from any hook in any thread and take effect at the next step boundary.
Those are tested through a real ``TrainingLoop``; the records on their own.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import evsys_async as ev
from evsys_async.events import Event, StopRequested

WAIT = 30.0


class StateTestNote(Event):
    """A user event a callback publishes through ``state.publish``."""

    text: str = ""


async def count_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    return {"loss": 1.0 / (step_idx + 1)}


class AtStep(ev.Callback):
    """Calls ``action(state)`` from its own thread after step ``at``, and is waited for."""

    controls_loop = True  # its requests land before the next step starts

    def __init__(self, at: int, action: Any) -> None:
        self.at = at
        self.action = action
        self.thread: int | None = None

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        if step_idx == self.at:
            self.thread = threading.get_ident()
            self.action(state)


class Events(ev.Callback):
    """Keeps every event that reaches ``on_event`` (stops, user events)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def on_event(self, state: ev.LoopState, event: Event) -> None:
        self.events.append(event)


# -- the records ---------------------------------------------------------------------


def test_run_dir_is_output_dir_and_run_key(tmp_path: Path) -> None:
    keyed = ev.LoopState(output_dir=tmp_path, ctx=ev.LogContext(run_key="r1"))
    assert keyed.run_dir == tmp_path / "r1"
    assert ev.LoopState(output_dir=tmp_path).run_dir == tmp_path


def test_mutable_defaults_are_never_shared() -> None:
    a, b = ev.LogContext(), ev.LogContext()
    a.ids["wandb"] = "url"
    a.extras["x"] = 1
    a.config["lr"] = 0.1
    assert b.ids == b.extras == b.config == b.run_config == {}
    s, t = ev.LoopState(), ev.LoopState()
    s.extras["k"] = 1
    assert t.extras == {} and s.ctx is not t.ctx
    art = ev.LoopArtifacts(run_dir=Path("x"))
    art.checkpoints.append({"name": "final"})
    assert ev.LoopArtifacts(run_dir=Path("x")).checkpoints == []


def test_the_records_defaults() -> None:
    state = ev.LoopState()
    assert (state.step, state.rank, state.world_size, state.start_step) == (0, 0, 1, 0)
    assert not state.stop_requested and state.stop_reason is None and state.artifacts is None
    art = ev.LoopArtifacts(run_dir=Path("r"))
    assert art.status == "running" and art.callback_report == {} and art.error is None
    out = ev.StepOutput(metrics={"loss": 1.0})
    assert out.batch is None and ev.StepOutput({"a": 1.0}, batch=[1]).batch == [1]


def test_callback_health_is_a_frozen_record() -> None:
    health = ev.CallbackHealth(delivered=3, failed=1, dropped=0, pending=0)
    assert not health.stuck and health.disabled is None and health.coalesced == 0
    with pytest.raises(AttributeError):
        health.delivered = 4  # type: ignore[misc]
    assert msgspec.to_builtins(health)["delivered"] == 3


def test_publish_outside_a_run_does_nothing() -> None:
    ev.LoopState().publish(StateTestNote(text="nobody listens"))  # no bus: no error


def test_request_stop_outside_a_run_first_request_wins_from_any_thread() -> None:
    state = ev.LoopState()
    start = threading.Barrier(8)

    def ask(i: int) -> None:
        start.wait()
        state.request_stop(f"reason {i}", failed=i % 2 == 0)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert state.stop_requested and state.stop_reason is not None
    winner = int(state.stop_reason.split()[-1])
    assert state.stop_failed is (winner % 2 == 0)  # reason and flag from the same request
    assert state.stop_source == ""  # not asked from a callback


# -- requests, through a run ---------------------------------------------------------


@pytest.mark.anyio
async def test_request_stop_ends_the_run_after_the_step_and_names_the_callback(
    tmp_path: Path,
) -> None:
    def stop(state: ev.LoopState) -> None:
        state.request_stop("enough")
        state.request_stop("too late")  # the first request wins

    events = Events()
    loop = ev.TrainingLoop(
        count_step,
        num_steps=10,
        output_dir=tmp_path,
        callbacks=[AtStep(2, stop), events],
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "stopped" and artifacts.steps_completed == 3
    assert artifacts.stop_reason == "enough"
    [stopped] = [e for e in events.events if isinstance(e, StopRequested)]
    assert stopped.step == 2 and stopped.reason == "enough" and stopped.source == "AtStep"


@pytest.mark.anyio
async def test_request_stop_failed_fails_the_run(tmp_path: Path) -> None:
    loop = ev.TrainingLoop(
        count_step,
        num_steps=10,
        output_dir=tmp_path,
        callbacks=[AtStep(0, lambda s: s.request_stop("metric missing", failed=True))],
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "failed" and artifacts.steps_completed == 1
    assert artifacts.stop_reason == "metric missing"


@pytest.mark.anyio
async def test_request_checkpoint_is_saved_at_the_next_boundary(tmp_path: Path) -> None:
    saved: list[tuple[str, int]] = []

    def checkpoint(state: ev.LoopState, name: str) -> dict[str, Any]:
        saved.append((name, state.step))
        return {"path": str(tmp_path / f"{name}.pt")}

    def ask(state: ev.LoopState) -> None:
        state.request_checkpoint("best")
        state.request_checkpoint("also")

    loop = ev.TrainingLoop(
        count_step,
        num_steps=5,
        output_dir=tmp_path,
        checkpoint=checkpoint,
        callbacks=[AtStep(1, ask)],
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert saved[:2] == [("best", 1), ("also", 1)]  # after step 1, in the order asked
    rows = [(r["name"], r["step"]) for r in artifacts.checkpoints]
    assert rows[:2] == [("best", 1), ("also", 1)]
    assert rows[2:] == [("final", 4)]  # nothing else asked for


class Never:
    """An evaluator that is never due by itself (``run_every = 0``)."""

    name = "val"
    run_every = 0

    def __init__(self) -> None:
        self.calls: list[int] = []

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        self.calls.append(step_idx)
        return {"acc": 1.0}


@pytest.mark.anyio
async def test_request_eval_runs_every_evaluator_at_the_next_boundary(tmp_path: Path) -> None:
    evaluator = Never()
    loop = ev.TrainingLoop(
        count_step,
        num_steps=6,
        output_dir=tmp_path,
        evaluators=[evaluator],
        callbacks=[AtStep(3, lambda s: s.request_eval())],
    )
    with anyio.fail_after(WAIT):
        await loop.run()
    assert evaluator.calls == [3]


@pytest.mark.anyio
async def test_publish_from_a_hook_reaches_the_runs_subscribers_stamped_with_its_key(
    tmp_path: Path,
) -> None:
    events = Events()
    caller = AtStep(1, lambda s: s.publish(StateTestNote(text="from a hook")))
    loop = ev.TrainingLoop(
        count_step, num_steps=3, output_dir=tmp_path, run_key="noted", callbacks=[caller, events]
    )
    with anyio.fail_after(WAIT):
        await loop.run()
    [note] = [e for e in events.events if isinstance(e, StateTestNote)]
    assert note.text == "from a hook" and note.run_key == loop.run_key == "noted"
    assert caller.thread is not None and caller.thread != threading.get_ident()  # its thread


def test_callback_health_is_ok_only_when_nothing_was_lost() -> None:
    from evsys_async.state import CallbackHealth, Degraded

    assert CallbackHealth(delivered=5, failed=0, dropped=0, pending=0).ok
    assert CallbackHealth(delivered=5, failed=0, dropped=3, pending=0, coalesced=3).ok
    bad = [
        CallbackHealth(delivered=5, failed=1, dropped=0, pending=0),
        CallbackHealth(delivered=5, failed=0, dropped=1, pending=0),
        CallbackHealth(delivered=5, failed=0, dropped=0, pending=1),
        CallbackHealth(delivered=5, failed=0, dropped=0, pending=0, hook_failures={"setup": 1}),
        CallbackHealth(delivered=5, failed=0, dropped=0, pending=0, disabled="setup failed"),
        CallbackHealth(delivered=5, failed=0, dropped=0, pending=0, stuck=True),
        CallbackHealth(
            delivered=5, failed=0, dropped=0, pending=0, degraded=Degraded("disk full", 3, 10)
        ),
    ]
    assert not any(h.ok for h in bad)


def test_new_event_fields_default_and_round_trip() -> None:
    from evsys_async.events import CallbackFailed, TrainStarted, decode, encode

    failed = CallbackFailed(subscriber="s", hook="on_step_end", event_type="StepEnded", error="x")
    assert failed.count == 1
    many = CallbackFailed(
        subscriber="s", hook="on_step_end", event_type="StepEnded", error="x", count=40
    )
    assert decode(encode(many)) == many
    started = TrainStarted(num_steps=3, config={"lr": 0.1, "name": "a"})
    assert decode(encode(started)).config == {"lr": 0.1, "name": "a"}
    assert TrainStarted(num_steps=3).config == {}


@pytest.mark.anyio
async def test_strict_fails_the_run_at_the_first_callback_error(tmp_path: Path) -> None:
    class Boom(ev.Callback):
        def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
            if step_idx == 2:
                raise RuntimeError("logger down")

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"loss": 1.0}

    loop = ev.TrainingLoop(step, num_steps=20, output_dir=tmp_path, callbacks=[Boom()], strict=True)
    with anyio.fail_after(30), pytest.raises(RuntimeError, match="logger down"):
        await loop.run()
    assert loop.artifacts is not None
    assert loop.artifacts.status == "failed"
    assert loop.artifacts.steps_completed == 3
