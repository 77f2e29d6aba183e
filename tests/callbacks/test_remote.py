"""Callbacks in their own process (``isolation = "process"``): every hook, state and
request crosses; deaths are reported and counted; no child outlives its parent.

Real child processes; what a child did comes back through files it writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.config import build_loop, load_config
from evsys_async.errors import ConfigError
from evsys_async.events import CallbackFailed, EvalEnded, StepEnded
from evsys_async.subscription import current_subscription
from tests.process_helpers import (
    AllAsync,
    ChildPing,
    Counting,
    Everything,
    Faulty,
    Requests,
    StopsAt,
    notes,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # callbacks in child processes

WAIT = 60
#: the repository, from which a child or a script imports ``tests.process_helpers``
ROOT = Path(__file__).resolve().parents[2]


async def step(state: ev.LoopState, step_idx: int) -> ev.StepOutput:
    if step_idx == 4:
        state.publish(ChildPing(n=step_idx))  # a user event: on_event in the child
    return ev.StepOutput(metrics={"loss": 1.0 / (step_idx + 1)}, batch=["live"])


class Acc:
    name, run_every = "val", 3

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"acc": step_idx / 100}


def checkpoint(state: ev.LoopState, name: str) -> dict[str, Any]:
    return {"path": f"ckpt-{name}"}


class Seen(ev.Callback):
    """An in-process sibling that keeps every envelope."""

    def __init__(self) -> None:
        self.envelopes: list[ev.Envelope] = []

    async def on_envelope(self, state: ev.LoopState, envelope: ev.Envelope) -> None:
        self.envelopes.append(envelope)

    def of(self, kind: type) -> list[Any]:
        return [e.event for e in self.envelopes if isinstance(e.event, kind)]


def loop_with(tmp_path: Path, *callbacks: ev.Callback, **kwargs: Any) -> ev.TrainingLoop:
    options: dict[str, Any] = {
        "num_steps": 10,
        "output_dir": tmp_path,
        "run_key": "proc",
        "evaluators": [Acc()],
        "drain_timeout": WAIT,
        "control_timeout": WAIT,
        **kwargs,
    }
    return ev.TrainingLoop(step, callbacks=list(callbacks), **options)


async def test_every_hook_runs_in_the_child_with_the_runs_state(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.jsonl")
    loop = loop_with(tmp_path, Everything(path), save_every=5, checkpoint=checkpoint)
    loop.ctx.run_config = {"lr": 0.1}
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    got = notes(path)
    assert {g["pid"] for g in got} != {os.getpid()} and len({g["pid"] for g in got}) == 1
    hooks = [g["hook"] for g in got]
    assert hooks[0] == "setup" and hooks[-1] == "teardown" and hooks[-2] == "flush"
    setup = got[0]
    assert setup["run_key"] == "proc" and setup["num_steps"] == 10
    assert setup["run_dir"] == str(artifacts.run_dir) and setup["config"] == {"lr": 0.1}
    assert setup["eval_names"] == ["val"] and (setup["rank"], setup["world_size"]) == (0, 1)
    steps = [g for g in got if g["hook"] == "on_step_end"]
    assert [g["step"] for g in steps] == list(range(10))
    assert all(g["batch"] is None for g in steps)  # the live batch does not cross
    assert steps[3]["metrics"] == {"loss": 0.25}
    evals = [g for g in got if g["hook"] == "on_eval"]  # async def, on the child's loop
    assert [(g["step"], g["name"]) for g in evals] == [(2, "val"), (5, "val"), (8, "val")]
    assert [g["state_step"] for g in evals] == [2, 5, 8]  # its state follows the events
    # one save per step: no "final" again after step_10
    assert [g["name"] for g in got if g["hook"] == "on_checkpoint"] == ["step_5", "step_10"]
    assert [g["status"] for g in got if g["hook"] == "on_train_end"] == ["completed"]
    assert "ChildPing" in [g.get("type") for g in got if g["hook"] == "on_event"]
    seqs = [g["seq"] for g in got if g["hook"] == "on_envelope"]
    assert seqs == sorted(seqs) and len(seqs) == len(steps) + len(evals) + 2 + 1 + 1 + 1
    assert got[-1]["step"] == 9  # teardown sees the last step's state
    h = artifacts.callback_report["Everything"]
    assert (h.failed, h.dropped, h.pending, h.stuck, h.disabled) == (0, 0, 0, False, None)
    assert h.delivered == len(seqs) and h.startup_seconds > 0


async def test_an_async_callback_runs_on_the_childs_event_loop(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.jsonl")
    with anyio.fail_after(WAIT):
        artifacts = await loop_with(tmp_path, AllAsync(path)).run()
    got = notes(path)
    assert os.getpid() not in {g["pid"] for g in got}
    assert [g["step"] for g in got if g["hook"] == "on_step_end"] == list(range(10))
    assert got[0]["hook"] == "setup" and got[-1]["hook"] == "teardown"
    assert artifacts.callback_report["AllAsync"].delivered == 10


async def test_requests_and_events_from_the_child_reach_the_run(tmp_path: Path) -> None:
    seen = Seen()
    loop = loop_with(tmp_path, Requests(), seen, checkpoint=checkpoint)
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "stopped" and artifacts.stop_reason == "asked to stop"
    assert artifacts.steps_completed == 7  # stopped before step 7: controls_loop
    assert [c["name"] for c in artifacts.checkpoints] == ["asked", "final"]
    assert artifacts.checkpoints[0]["step"] == 1  # at the boundary after step 1
    assert [e.step for e in seen.of(EvalEnded)] == [1, 2, 5]  # the asked eval, then due ones
    [ping] = [p for p in seen.of(ChildPing) if p.n != 4]  # the step publishes n=4
    assert ping.n == 1 and ping.run_key == "proc"  # stamped with the run's key
    [stop] = seen.of(ev.events.StopRequested)
    assert stop.source == "Requests"  # the stop names the callback, as in a thread


@pytest.mark.parametrize("at", [0, 4])
async def test_controls_loop_stops_at_the_same_step_as_in_a_thread(at: int, tmp_path: Path) -> None:
    results = {}
    for isolation in ("thread", "process"):
        cb = StopsAt(at)
        cb.isolation = isolation
        with anyio.fail_after(WAIT):
            artifacts = await loop_with(tmp_path / isolation, cb).run()
        results[isolation] = (artifacts.status, artifacts.steps_completed, artifacts.stop_reason)
    assert results["process"] == results["thread"] == ("stopped", at + 1, f"stop at {at}")


async def test_state_dict_and_load_state_dict_cross_on_save_and_resume(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.jsonl")

    def make() -> ev.Callback:
        [cb] = ev.build_callbacks(
            [{"kind": "test_process_counting", "params": {"path": path}, "isolation": "process"}]
        )
        return cb

    first = make()
    assert first.built_from == ("test_process_counting", {"path": path})
    assert first.isolation == "process"
    with anyio.fail_after(WAIT):
        a = await loop_with(tmp_path, first, save_every=5, checkpoint=checkpoint).run()
    saved = json.loads((a.run_dir / "callbacks_state.json").read_text())
    assert saved["Counting"]["count"] == 10 and saved["Counting"]["pid"] != os.getpid()
    assert first.count == 0  # the parent's copy is not the one that counted
    with anyio.fail_after(WAIT):
        b = await loop_with(tmp_path, make(), checkpoint=checkpoint).run(
            num_steps=15, start_step=10
        )
    assert b.status == "completed"
    got = notes(path)
    # loaded into the parent's copy, whose state is shipped, and so into the child's
    [here, there] = [g for g in got if g["hook"] == "load_state_dict"]
    assert here["pid"] == os.getpid() and there["pid"] != os.getpid()
    assert here["count"] == there["count"] == 10
    assert [g["count"] for g in got if g["hook"] == "on_step_end"][-1] == 15
    again = json.loads((b.run_dir / "callbacks_state.json").read_text())
    assert again["Counting"]["count"] == 15


async def test_a_pickled_callback_is_shipped_with_its_loaded_state(tmp_path: Path) -> None:
    path = str(tmp_path / "notes.jsonl")
    cb = Counting(path)
    cb.isolation = "process"
    with anyio.fail_after(WAIT):
        a = await loop_with(tmp_path, cb, checkpoint=checkpoint).run()
    cb2 = Counting(path)
    cb2.isolation = "process"
    with anyio.fail_after(WAIT):
        await loop_with(tmp_path, cb2, checkpoint=checkpoint).run(num_steps=12, start_step=10)
    assert cb2.count == 10  # loaded here before it was subscribed, then shipped
    assert [g["count"] for g in notes(path) if g["hook"] == "on_step_end"][-2:] == [11, 12]
    assert a.status == "completed"


async def test_a_config_entry_runs_a_callback_in_its_process(tmp_path: Path) -> None:
    path = tmp_path / "notes.jsonl"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"""name: cfg
output_dir: {tmp_path / "runs"}
num_steps: 6
step: tests.process_helpers:config_step
callbacks:
  - kind: test_process_counting
    params: {{path: {path}}}
    isolation: process
""",
        encoding="utf-8",
    )
    loop = build_loop(load_config(config))  # type: ignore[arg-type]
    [cb] = loop.callbacks
    assert cb.isolation == "process" and cb.built_from is not None
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    got = notes(path)
    assert [g["step"] for g in got] == list(range(6))
    assert os.getpid() not in {g["pid"] for g in got}


def test_a_wrong_isolation_in_a_config_is_placed(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(
        "num_steps: 3\ncallbacks:\n  - kind: print_progress\n    isolation: proces\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    text = str(raised.value)
    assert "run.yaml:4" in text and "callbacks[0].isolation" in text and "'process'" in text
    with pytest.raises(ConfigError, match=r"callbacks\[0\].isolation.*'process'"):
        ev.build_callbacks([{"kind": "print_progress", "isolation": "proces"}])


class Unpicklable(ev.Callback):
    isolation = "process"

    def __init__(self) -> None:
        self.lock = threading.Lock()  # live: cannot cross

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        pass


async def test_a_callback_that_cannot_be_pickled_is_refused_before_the_first_step(
    tmp_path: Path,
) -> None:
    ran: list[int] = []

    async def counted(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        ran.append(step_idx)
        return {}

    loop = ev.TrainingLoop(counted, num_steps=3, output_dir=tmp_path, callbacks=[Unpicklable()])
    with anyio.fail_after(WAIT), pytest.raises(TypeError) as raised:
        await loop.run()
    text = str(raised.value)
    assert "'Unpicklable'" in text and "lock" in text and "module level" in text
    assert "kind and params" in text
    assert ran == []


@pytest.mark.parametrize(
    ("fault", "hook", "reason"),
    [
        ("raise", "on_step_end", None),
        ("exit", "on_step_end", "process died: exit code 3"),
        ("sigkill", "on_step_end", "process died: SIGKILL"),
        ("segfault", "on_step_end", "process died: SIGSEGV"),
        ("spin", "on_step_end", "killed after hook_timeout (0.3s)"),
        ("sigkill", "flush", "process died: SIGKILL"),
        ("exit", "setup", "process died: exit code 3"),
        ("exit", "teardown", "process died: exit code 3"),
    ],
)
async def test_a_dying_callback_never_ends_training_and_is_counted(
    fault: str, hook: str, reason: str | None, tmp_path: Path
) -> None:
    seen = Seen()
    hostile = Faulty(fault, hook)
    if fault == "spin":
        hostile.hook_timeout = 0.3  # type: ignore[misc]
    loop = loop_with(tmp_path, hostile, seen, num_steps=30, drain_timeout=20)
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.status == "completed" and artifacts.steps_completed == 30
    h = artifacts.callback_report["Faulty"]
    assert h.delivered + h.failed + h.dropped + h.pending == len(seen.of(StepEnded)) == 30
    assert h.disabled == reason
    assert h.stuck is (reason is not None)
    failures = [e for e in seen.of(CallbackFailed) if e.subscriber == "Faulty"]
    if hook != "teardown":  # the sibling may have ended before that one
        assert failures, "the failure was announced"
    if fault == "raise":
        assert (h.delivered, h.failed) == (29, 1) and "raise ValueError" in failures[0].traceback
    elif hook == "on_step_end":
        assert (h.delivered, h.failed, h.dropped) == (3, 1, 26)  # steps 0-2, 3 failed
    elif hook == "setup":
        assert (h.delivered, h.failed, h.dropped) == (0, 0, 30)
    elif hook == "teardown":
        assert (h.delivered, h.failed, h.dropped) == (30, 0, 0)
    # the sibling's and the loggers' view is whole
    assert [e.step for e in seen.of(StepEnded)] == list(range(30))


# -- the parent dies, or is interrupted ----------------------------------------------

SCRIPT = """
import sys
sys.path[:0] = [{root!r}]
import anyio
import evsys_async as ev
from tests.process_helpers import Blocks

async def step(state, i):
    if i == 3:
        with open({ready!r}, "w") as f:
            f.write("ready")
    await anyio.sleep(0.01)
    return {{"loss": 1.0}}

def main():
    loop = ev.TrainingLoop(step, num_steps={steps}, output_dir={out!r},
                           callbacks=[Blocks({notes!r}, spin={spin})], drain_timeout=30)
    try:
        artifacts = loop.run_sync(backend={backend!r})
    except KeyboardInterrupt:
        print("status", loop.artifacts.status, flush=True)
        sys.exit(130)
    print("status", artifacts.status, flush=True)

if __name__ == "__main__":
    main()
"""


def _script(tmp_path: Path, *, steps: int, spin: float, backend: str) -> Path:
    script = tmp_path / "parent.py"
    script.write_text(
        SCRIPT.format(
            root=str(ROOT),
            ready=str(tmp_path / "ready"),
            out=str(tmp_path / "runs"),
            notes=str(tmp_path / "notes.jsonl"),
            steps=steps,
            spin=spin,
            backend=backend,
        ),
        encoding="utf-8",
    )
    return script


def _wait_for(check: Any, what: str, timeout: float = WAIT) -> None:
    """A bounded wait for another process (a poll: nothing here can be awaited)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _gone(pid: int) -> bool:
    """The process has ended (a zombie nobody reaped counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_no_child_outlives_a_parent_killed_with_sigkill(backend: str, tmp_path: Path) -> None:
    script = _script(tmp_path, steps=100_000, spin=0.05, backend=backend)
    # killed, the parent cannot remove its multiprocessing temp dir: let that be in tmp_path
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    parent = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env)
    try:
        _wait_for(lambda: (tmp_path / "ready").exists() and notes(tmp_path / "notes.jsonl"),
                  "the run and its callback's process to start")  # fmt: skip
        [setup] = notes(tmp_path / "notes.jsonl")
        child = setup["pid"]
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(WAIT)
        _wait_for(lambda: _gone(child), "the callback's process to end")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_ends_the_children_through_the_shutdown(backend: str, tmp_path: Path) -> None:
    script = _script(tmp_path, steps=100_000, spin=0.0, backend=backend)
    parent = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: Ctrl-C goes to it and its children
    )
    try:
        _wait_for(lambda: (tmp_path / "ready").exists() and notes(tmp_path / "notes.jsonl"),
                  "the run and its callback's process to start")  # fmt: skip
        child = notes(tmp_path / "notes.jsonl")[0]["pid"]
        os.killpg(parent.pid, signal.SIGINT)  # the whole group, as a terminal's Ctrl-C does
        out, _ = parent.communicate(timeout=WAIT)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert parent.returncode == 130
    assert "status cancelled" in out
    got = notes(tmp_path / "notes.jsonl")
    assert [g["hook"] for g in got] == ["setup", "teardown"]  # ended by the shutdown
    assert got[1]["pid"] == child
    _wait_for(lambda: _gone(child), "the callback's process to end")


def test_the_example_runs(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "process_callback.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=True,
    )
    lines = out.stdout.splitlines()
    assert "completed 300" in lines
    assert any(line.startswith("histogram: handled ") for line in lines)  # from its process


class DefHooks(ev.Callback):
    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        pass


class AsyncHooks(ev.Callback):
    def __init__(self) -> None:
        self.threads: set[str] = set()

    async def on_step_end(
        self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any
    ) -> None:
        self.threads.add(threading.current_thread().name)
        sub = current_subscription()
        self.threads.add(f"isolation={sub.isolation if sub is not None else None}")


@pytest.mark.parametrize(
    ("isolation", "error", "words"),
    [("proces", ValueError, "'process'"), ("task", TypeError, "async def")],
)
def test_an_isolation_a_callback_cannot_have_is_refused(
    isolation: str, error: type[Exception], words: str, tmp_path: Path
) -> None:
    cb = DefHooks()
    cb.isolation = isolation
    with pytest.raises(error, match=r"DefHooks\.isolation") as raised:
        ev.TrainingLoop(step, num_steps=1, output_dir=tmp_path, callbacks=[cb]).run_sync()
    assert words in str(raised.value)


async def test_isolation_thread_runs_async_hooks_from_a_thread(tmp_path: Path) -> None:
    cb = AsyncHooks()
    cb.isolation = "thread"  # its hooks still run on the loop, one at a time, from its thread
    with anyio.fail_after(WAIT):
        artifacts = await loop_with(tmp_path, cb).run()
    assert artifacts.callback_report["AsyncHooks"].delivered == 10
    # awaited on the loop's thread, for a subscriber that is a thread
    assert cb.threads == {threading.current_thread().name, "isolation=thread"}


# -- health in a callback's own process -------------------------------------------------
#
# The callbacks below are defined here, at module level: the child imports them from
# ``tests.callbacks.test_remote`` by that name.


class SetupFails(ev.Callback):
    """``setup`` cannot connect; every other hook notes that it ran (in the child)."""

    isolation = "process"

    def __init__(self, path: str, without_setup: bool = False) -> None:
        self.path = path
        self.runs_without_setup = without_setup  # type: ignore[misc]

    def setup(self, state: ev.LoopState) -> None:
        raise ConnectionError("refused")

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        from tests.process_helpers import note

        note(self.path, hook="on_step_end", step=step_idx)

    def flush(self) -> None:
        from tests.process_helpers import note

        note(self.path, hook="flush")

    def teardown(self, state: ev.LoopState) -> None:
        from tests.process_helpers import note

        note(self.path, hook="teardown")


class FailsFrom(ev.Callback):
    """Fails on every step from ``at`` on; sets ``degraded`` and ``disabled_reason``
    there, as a writer that lost rows would."""

    isolation = "process"

    def __init__(self, at: int, limit: int | None = None) -> None:
        self.at = at
        self.max_consecutive_failures = limit  # type: ignore[misc]

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        if step_idx >= self.at:
            self.degraded = ev.Degraded("server down", rows_lost=step_idx - self.at + 1)
            self.disabled_reason = "gave up on the server"
            raise RuntimeError(f"server down at {step_idx}")


class LeavesAThread(ev.Callback):
    """Starts a non-daemon thread in ``setup`` that never ends."""

    isolation = "process"

    def setup(self, state: ev.LoopState) -> None:
        # daemon=False said outright: a thread started from the hook's (daemon) thread
        # would be a daemon by default, as a client library's often is not
        threading.Thread(target=threading.Event().wait, name="user-flusher", daemon=False).start()

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        pass


@pytest.mark.parametrize("without_setup", [False, True])
async def test_a_process_callback_whose_setup_failed_is_disabled(
    without_setup: bool, tmp_path: Path
) -> None:
    path = str(tmp_path / "notes.jsonl")
    loop = loop_with(tmp_path, SetupFails(path, without_setup), num_steps=8)
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    hooks = [g["hook"] for g in notes(path)]
    h = artifacts.callback_report["SetupFails"]
    assert h.delivered + h.failed + h.dropped + h.pending == 8
    if without_setup:
        assert hooks.count("on_step_end") == 8 and h.delivered == 8 and h.disabled is None
    else:  # no hook on the half-built object in the child; teardown still cleans up
        assert hooks == ["teardown"]
        assert (h.delivered, h.dropped) == (0, 8)
        assert h.disabled == "setup failed: ConnectionError: refused"


async def test_a_process_callback_failing_on_every_event_is_told_once_then_summed(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    n = 300
    loop = loop_with(tmp_path, FailsFrom(0), seen, num_steps=n)
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    h = artifacts.callback_report["FailsFrom"]
    assert (h.delivered, h.failed, h.dropped, h.pending) == (0, n, 0, 0)
    firsts = [r for r in warnings_log.records if r.getMessage().startswith("callback failed")]
    [first] = firsts  # with the child's traceback as its cause
    assert "server down at 0" in first.getMessage()
    failed = [e for e in seen.of(CallbackFailed) if e.subscriber == "FailsFrom"]
    assert sum(e.count for e in failed) == n
    assert "server down at 0" in failed[0].traceback  # the child's frames, once
    assert all(e.traceback == "" for e in failed[1:])


async def test_max_consecutive_failures_is_kept_in_the_childs_own_order(tmp_path: Path) -> None:
    loop = loop_with(tmp_path, FailsFrom(4, limit=3), num_steps=40)
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    h = artifacts.callback_report["FailsFrom"]
    assert (h.delivered, h.failed, h.dropped, h.pending) == (4, 3, 33, 0)
    assert h.disabled == "3 failures in a row (the last: RuntimeError: server down at 6)"


async def test_a_process_callbacks_degraded_and_disabled_reason_reach_the_parent(
    tmp_path: Path,
) -> None:
    from evsys_async.callbacks._adapter import CallbackAdapter

    adapter = CallbackAdapter(FailsFrom(2), ev.LoopState(num_steps=5, output_dir=tmp_path))
    with anyio.fail_after(WAIT):
        async with ev.EventBus() as bus:
            sub = adapter.subscribe(bus)
            for i in range(5):
                bus.publish(StepEnded(step=i, num_steps=5))
            assert await sub.aclose(WAIT)
    assert adapter.degraded == ev.Degraded("server down", rows_lost=3)
    assert adapter.disabled_reason == "gave up on the server"
    assert adapter.callback.degraded is None  # the parent's copy never ran a hook


async def test_a_child_exits_once_closed_whatever_threads_it_left(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    loop = loop_with(tmp_path, LeavesAThread(), num_steps=20)
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    h = artifacts.callback_report["LeavesAThread"]
    assert (h.delivered, h.stuck, h.disabled) == (20, False, None)
    # the old way, the child joined its non-daemon thread at exit and was killed after
    # a grace: it would have said so
    assert not [r for r in warnings_log.records if "did not exit" in r.getMessage()]
    assert not [r for r in warnings_log.records if "killed" in r.getMessage()]


def test_a_process_callback_defined_in_python_c_is_refused_before_step_0(
    tmp_path: Path,
) -> None:
    script = (
        "import evsys_async as ev\n"
        "class Plot(ev.Callback):\n"
        "    isolation = 'process'\n"
        "    def on_step_end(self, state, i, b, m): print('step', i)\n"
        "async def step(state, i):\n"
        "    print('ran step', i)\n"
        "    return {}\n"
        f"loop = ev.TrainingLoop(step, num_steps=3, output_dir={str(tmp_path)!r},"
        " callbacks=[Plot()])\n"
        "loop.run_sync()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT, cwd=tmp_path
    )
    assert out.returncode != 0
    assert "ran step" not in out.stdout  # refused before step 0
    assert "TypeError" in out.stderr and "'Plot'" in out.stderr
    assert "defined in __main__ of an interactive session" in out.stderr
    assert "Define it in a module" in out.stderr
