"""A service's handle on a run (``loop/_control.py``, ``loop/_subscribers.py``):
``loop.subscribe`` follows exactly the run, whatever key it claims; ``claim()`` gives the
key before the run; ``request_stop`` and ``cancel`` work from any thread, before, during
and after a run; ``cancel`` ends a run with a step in flight (an ``async def`` step at
its next await, a hung ``def`` step abandoned after its grace), through the one shutdown.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.events import Event, StepEnded
from tests.loop.helpers import WAIT, Recorder, loss_step

pytestmark = pytest.mark.anyio


class ControlNote(Event, kw_only=True):
    text: str


class Events:
    """A plain bus handler that keeps what it gets, and the loop's key at the first."""

    def __init__(self, loop: ev.TrainingLoop | None = None) -> None:
        self.events: list[Event] = []
        self.key_at_first: str | None = None
        self.loop = loop
        self.closed = 0

    def __call__(self, event: Event) -> None:
        if not self.events and self.loop is not None:
            self.key_at_first = self.loop.run_key
        self.events.append(event)

    def on_close(self) -> None:
        self.closed += 1

    def names(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    def steps(self) -> list[int]:
        return [e.step for e in self.events if isinstance(e, StepEnded)]


async def test_subscribe_follows_the_run_whatever_key_it_claims(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "old.txt").write_text("another run's file")
    async with ev.EventBus() as bus:
        by_key = Events()
        bus.subscribe(by_key, run_key="x")  # the trap: the run becomes x-1
        loop = ev.TrainingLoop(loss_step, num_steps=5, output_dir=tmp_path, run_key="x", bus=bus)
        mine = Events(loop)
        handle = loop.subscribe(mine, name="mine")
        given = Events()
        loop2 = ev.TrainingLoop(
            loss_step, num_steps=3, output_dir=tmp_path, run_key="x", bus=bus, subscribers=[given]
        )
        with anyio.fail_after(WAIT):
            await loop.run()
            await loop2.run()
    assert loop.run_key == "x-1" and loop2.run_key == "x-2"
    assert mine.key_at_first == "x-1"  # known before the first event
    assert mine.names() == ["TrainStarted", *["StepEnded"] * 5, "TrainEnded"]
    assert {e.run_key for e in mine.events} == {"x-1"}
    assert given.steps() == [0, 1, 2] and {e.run_key for e in given.events} == {"x-2"}
    assert by_key.events == []
    assert handle.run_key == "x-1" and handle.name == "mine"
    stats = handle.stats()
    assert stats is not None and stats.delivered == 7 and stats.pending == 0


async def test_claim_gives_the_key_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "old.txt").write_text("another run's file")
    loop = ev.TrainingLoop(loss_step, num_steps=2, output_dir=tmp_path, run_key="x")
    assert loop.claim() == "x-1" and loop.claim() == "x-1"  # a second call: the same
    assert (tmp_path / "x-1").is_dir()
    with pytest.raises(ValueError, match="resume without claim"):
        await loop.run(start_step=1)
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.run_dir == tmp_path / "x-1"
    assert not (tmp_path / "x-2").exists()  # the claimed dir, not another


async def test_subscribe_while_running_and_close_while_running(tmp_path: Path) -> None:
    late, leaving = Events(), Events()
    holder: dict[str, Any] = {}
    left = threading.Event()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 3:  # from another thread, as a service's request would
            t = threading.Thread(target=lambda: holder.update(late=loop.subscribe(late)))
            t.start()
            t.join()
        if step_idx == 6:
            holder["leaving"].close()
            await anyio.to_thread.run_sync(left.wait, WAIT)  # its on_close ran
        return {"loss": 1.0}

    def on_close() -> None:
        leaving.on_close()
        left.set()

    loop = ev.TrainingLoop(step, num_steps=10, output_dir=tmp_path)
    holder["leaving"] = loop.subscribe(leaving, on_close=on_close)
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    steps = late.steps()
    assert steps == list(range(steps[0], 10)) and steps[0] >= 3  # joined the run, in order
    assert late.names()[-1] == "TrainEnded"
    # what was published before the close is still its; nothing after
    assert leaving.steps() == [0, 1, 2, 3, 4, 5] and "TrainEnded" not in leaving.names()
    assert leaving.closed == 1  # its on_close ran when it left
    assert holder["late"].stats().pending == 0


async def test_request_stop_before_during_and_after_a_run(tmp_path: Path) -> None:
    loop = ev.TrainingLoop(loss_step, num_steps=50, output_dir=tmp_path)
    loop.request_stop("before")  # kept for the first run: it ends after its first step
    with anyio.fail_after(WAIT):
        first = await loop.run()
    assert (first.status, first.steps_completed, first.stop_reason) == ("stopped", 1, "before")

    loop.request_stop("after")  # a run ended: nothing to stop
    with anyio.fail_after(WAIT):
        second = await loop.run()
    assert (second.status, second.steps_completed) == ("completed", 50)

    asked = threading.Event()

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 10:  # from a thread that is not the loop's, mid-run

            def ask() -> None:
                loop3.request_stop("during")
                asked.set()

            threading.Thread(target=ask).start()
            asked.wait(WAIT)
        return {"loss": 1.0}

    loop3 = ev.TrainingLoop(step, num_steps=1000, output_dir=tmp_path)
    with anyio.fail_after(WAIT):
        third = await loop3.run()
    assert (third.status, third.steps_completed, third.stop_reason) == ("stopped", 11, "during")


async def test_cancel_ends_an_async_step_at_its_next_await(tmp_path: Path) -> None:
    rec, saved = Recorder(), []
    started = anyio.Event()

    async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 3:
            started.set()
            await anyio.sleep_forever()  # a step that never ends by itself
        return {"loss": 1.0}

    loop = ev.TrainingLoop(
        step, num_steps=100, output_dir=tmp_path, run_key="c", callbacks=[rec],
        checkpoint=lambda state, name: saved.append(name),
    )  # fmt: skip
    result: dict[str, ev.LoopArtifacts] = {}

    async def run() -> None:
        result["a"] = await loop.run()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await started.wait()
            loop.cancel("asked to stop now")
    artifacts = result["a"]  # returned, not raised: nobody cancelled the caller
    assert (artifacts.status, artifacts.steps_completed) == ("cancelled", 3)
    assert artifacts.stop_reason == "asked to stop now"
    assert rec.steps() == [0, 1, 2] and rec.calls[-1] == ("end", "cancelled")
    assert saved == ["interrupted"]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["status"] == "cancelled" and manifest["stop_reason"] == "asked to stop now"
    loop.cancel("after the run")  # does nothing


async def test_cancel_abandons_a_hung_def_step_after_its_grace(tmp_path: Path) -> None:
    hung, release, returned = threading.Event(), threading.Event(), threading.Event()
    saved: list[str] = []

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 3:
            hung.set()
            release.wait(WAIT)  # a stuck data loader
            returned.set()
        return {"loss": 1.0}

    async with ev.EventBus() as bus:
        seen = Events()
        loop = ev.TrainingLoop(
            step, num_steps=100, output_dir=tmp_path, run_key="h", bus=bus,
            checkpoint=lambda state, name: saved.append(name),
        )  # fmt: skip
        loop.subscribe(seen)
        with anyio.fail_after(WAIT):
            async with anyio.create_task_group() as tg:
                tg.start_soon(loop.run)
                await anyio.to_thread.run_sync(hung.wait, WAIT)
                threading.Thread(
                    target=loop.cancel, args=("stuck",), kwargs={"grace": 0.05}
                ).start()
        artifacts = loop.artifacts
        assert artifacts is not None and artifacts.status == "cancelled"
        assert artifacts.stop_reason == "stuck" and artifacts.steps_completed == 3
        assert saved == []  # no checkpoint while the abandoned step may change the model
        assert seen.names()[-1] == "TrainEnded" and seen.steps() == [0, 1, 2]
        assert json.loads((tmp_path / "h" / "manifest.json").read_text())["status"] == "cancelled"
        release.set()  # the hung step returns late: its result is dropped
        with anyio.fail_after(WAIT):
            await anyio.to_thread.run_sync(returned.wait, WAIT)
            for thread in threading.enumerate():
                if thread.name == "evsys-step:h":
                    await anyio.to_thread.run_sync(thread.join, WAIT)
        assert artifacts.steps_completed == 3 and seen.steps() == [0, 1, 2]
        assert bus.dropped_after_close == 0 and bus.stats()["Events"].pending == 0


async def test_cancel_before_the_first_run_ends_it_before_its_first_step(tmp_path: Path) -> None:
    rec = Recorder()
    loop = ev.TrainingLoop(loss_step, num_steps=10, output_dir=tmp_path, callbacks=[rec])
    loop.cancel("never mind")
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert (artifacts.status, artifacts.steps_completed) == ("cancelled", 0)
    assert artifacts.stop_reason == "never mind"
    assert rec.steps() == [] and rec.calls[-1] == ("end", "cancelled")


async def test_publish_reaches_the_run_from_any_thread_and_nothing_outside(tmp_path: Path) -> None:
    got = Events()
    loop = ev.TrainingLoop(loss_step, num_steps=1, output_dir=tmp_path, run_key="p")
    loop.publish(ControlNote(text="before"))  # no run: nothing

    class Publisher(ev.Callback):
        def on_train_start(self, state: ev.LoopState) -> None:  # its own thread
            loop.publish(ControlNote(text="from a thread"))

    loop.callbacks.append(Publisher())
    loop.subscribe(got, events=(ControlNote,))
    with anyio.fail_after(WAIT):
        await loop.run()
    assert [(e.text, e.run_key) for e in got.events if isinstance(e, ControlNote)] == [
        ("from a thread", "p")
    ]


def test_subscribe_checks_the_handler_when_it_is_called(tmp_path: Path) -> None:
    loop = ev.TrainingLoop(loss_step, num_steps=1, output_dir=tmp_path)
    with pytest.raises(TypeError, match="Event subclasses"):
        loop.subscribe(print, events=(int,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grace"):
        loop.cancel(grace=-1)
