"""Handlers and callbacks that run in a child process in the tests (``isolation="process"``).

They live at module level, in a module with light imports, so that they pickle by
reference and a child imports them quickly. What a child does comes back through
files (one JSON line per call, with the child's pid) or through its own messages.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import evsys_async as ev
from evsys_async.events import Event, StepEnded


class ChildPing(Event, kw_only=True):
    """A user event a child publishes and a parent sees."""

    n: int


def note(path: str | Path, **fields: Any) -> None:
    """Append one JSON line (with this process's pid) to ``path``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"pid": os.getpid(), **fields}, default=str) + "\n")


def notes(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]


def act(fault: str) -> None:
    """Do ``fault`` here and now (in the child)."""
    if fault == "raise":
        raise ValueError("hostile")
    if fault == "exit":
        os._exit(3)
    if fault == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "segfault":
        ctypes.string_at(0)
    if fault == "hang":
        time.sleep(60)
    if fault == "spin":  # CPU-bound, past any timeout a test sets
        end = time.monotonic() + 60
        while time.monotonic() < end:
            pass


# -- plain bus handlers ----------------------------------------------------------------


class Recorder:
    """A ``def`` handler: notes each event's step; does ``fault`` at step ``at``."""

    def __init__(self, path: str | Path, fault: str = "", at: int = -1) -> None:
        self.path, self.fault, self.at = str(path), fault, at

    def __call__(self, event: Any) -> None:
        inner = event.event if isinstance(event, ev.Envelope) else event
        seq = event.seq if isinstance(event, ev.Envelope) else None
        note(self.path, kind="event", step=inner.step, seq=seq)
        if inner.step == self.at:
            act(self.fault)

    def start(self) -> None:
        note(self.path, kind="on_start")

    def batch_end(self) -> None:
        note(self.path, kind="on_batch_end")

    def close(self) -> None:
        note(self.path, kind="on_close")


class AsyncRecorder(Recorder):
    """The same as an ``async def`` handler (runs on the child's event loop)."""

    async def __call__(self, event: Any) -> None:  # type: ignore[override]
        import anyio.lowlevel

        await anyio.lowlevel.checkpoint()
        super().__call__(event)


class Talker:
    """Logs, prints and writes to stderr for each event."""

    def __call__(self, event: StepEnded) -> None:
        logging.getLogger("evsys_async.test_child").warning("child says %d", event.step)
        print(f"out {event.step}")
        print(f"err {event.step}", file=sys.stderr)
        if event.step == 1:
            try:
                raise KeyError("logged")
            except KeyError:
                logging.getLogger("evsys_async.test_child").exception("with a traceback")


class Asks:
    """A ``def`` handler that sends each event's step to the parent, as bytes, with
    ``request_parent`` (and notes whether it is in its own process)."""

    def __call__(self, event: StepEnded) -> None:
        from evsys_async.bus import in_subscriber_process, request_parent

        assert in_subscriber_process()
        request_parent(b"step %d" % event.step)


def whereami() -> int:
    return os.getpid()


def fails() -> None:
    raise LookupError("in the child")


# -- callbacks -------------------------------------------------------------------------


class Everything(ev.Callback):
    """Overrides every loop-scope hook; notes each call and what the state says."""

    isolation = "process"

    def __init__(self, path: str) -> None:
        self.path = path

    def _state(self, state: ev.LoopState) -> dict[str, Any]:
        return {
            "run_key": state.ctx.run_key,
            "num_steps": state.num_steps,
            "run_dir": str(state.run_dir),
            "config": state.ctx.run_config,
            "eval_names": list(state.eval_names),
            "rank": state.rank,
            "world_size": state.world_size,
            "start_step": state.start_step,
            "step": state.step,
        }

    def setup(self, state: ev.LoopState) -> None:
        note(self.path, hook="setup", **self._state(state))

    def on_train_start(self, state: ev.LoopState) -> None:
        note(self.path, hook="on_train_start")

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        note(self.path, hook="on_step_end", step=step_idx, batch=batch, metrics=dict(metrics))

    async def on_eval(
        self, state: ev.LoopState, step_idx: int, eval_name: str, metrics: Any
    ) -> None:
        note(self.path, hook="on_eval", step=step_idx, name=eval_name, state_step=state.step)

    def on_checkpoint(self, state: ev.LoopState, row: Any) -> None:
        note(self.path, hook="on_checkpoint", name=row["name"])

    def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
        note(self.path, hook="on_train_end", status=artifacts.status)

    def on_event(self, state: ev.LoopState, event: Event) -> None:
        note(self.path, hook="on_event", type=type(event).__name__)

    def on_envelope(self, state: ev.LoopState, envelope: ev.Envelope) -> None:
        note(self.path, hook="on_envelope", seq=envelope.seq)

    def flush(self) -> None:
        note(self.path, hook="flush")

    def teardown(self, state: ev.LoopState) -> None:
        note(self.path, hook="teardown", **self._state(state))


class AllAsync(ev.Callback):
    """Every hook ``async def``: runs on the child's event loop."""

    isolation = "process"

    def __init__(self, path: str) -> None:
        self.path = path

    async def setup(self, state: ev.LoopState) -> None:
        note(self.path, hook="setup")

    async def on_step_end(
        self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any
    ) -> None:
        note(self.path, hook="on_step_end", step=step_idx)

    async def flush(self) -> None:
        note(self.path, hook="flush")

    async def teardown(self, state: ev.LoopState) -> None:
        note(self.path, hook="teardown")


class Requests(ev.Callback):
    """Asks the run for a checkpoint, an eval and a stop, and publishes an event."""

    isolation = "process"
    controls_loop = True

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        if step_idx == 1:
            state.request_checkpoint("asked")
            state.request_eval()
            state.publish(ChildPing(n=step_idx))
        if step_idx == 6:
            state.request_stop("asked to stop")


class StopsAt(ev.Callback):
    """A ``controls_loop`` callback that stops the run on step ``at``'s event."""

    controls_loop = True

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        if step_idx == self.at:
            state.request_stop(f"stop at {step_idx}")


@ev.register_callback("test_process_counting")
class Counting(ev.Callback):
    """A registered kind with state: counts steps; ``state_dict`` says how many."""

    def __init__(self, path: str, fault: str = "", at: int = -1) -> None:
        self.path, self.fault, self.at = path, fault, at
        self.count = 0

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self.count += 1
        note(self.path, hook="on_step_end", step=step_idx, count=self.count)
        if step_idx == self.at:
            act(self.fault)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "pid": os.getpid()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        note(self.path, hook="load_state_dict", count=self.count)


class Faulty(ev.Callback):
    """Does ``fault`` in ``hook`` on step ``at`` (or at once in a lifecycle hook)."""

    isolation = "process"

    def __init__(self, fault: str, hook: str = "on_step_end", at: int = 3) -> None:
        self.fault, self.hook, self.at = fault, hook, at
        self.steps = 0

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self.steps += 1
        if self.hook == "on_step_end" and step_idx == self.at:
            act(self.fault)

    def flush(self) -> None:
        if self.hook == "flush" and self.steps > self.at:
            act(self.fault)

    def setup(self, state: ev.LoopState) -> None:
        if self.hook == "setup":
            act(self.fault)

    def teardown(self, state: ev.LoopState) -> None:
        if self.hook == "teardown":
            act(self.fault)


class Hostile(ev.Callback):
    """The fault matrix's hostile callback in a process: ``fault`` in ``hook`` at its
    ``fire_at``-th call (a class per hook below, so it overrides that hook only)."""

    isolation = "process"
    hook = ""

    def __init__(self, fault: str, fire_at: int) -> None:
        self.fault, self.fire_at = fault, fire_at
        self.calls = 0
        self.state: ev.LoopState | None = None
        # as the in-process matrix: the loop waits for it, so where a stop lands is exact
        self.controls_loop = fault == "request_stop"
        self.hook_timeout = 0.05 if fault == "hang" else None

    def fire(self, state: ev.LoopState | None) -> None:
        self.state = state or self.state
        self.calls += 1
        if self.fault == "raise" or self.calls == self.fire_at:
            if self.fault == "request_stop":
                assert self.state is not None
                self.state.request_stop("hostile stop")
            elif self.fault == "publish":
                assert self.state is not None
                self.state.publish(ChildPing(n=self.calls))
            else:
                act(self.fault)

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self.state = state
        if self.hook == "on_step_end":
            self.fire(state)


def _hostile(hook: str) -> type[Hostile]:
    def method(self: Hostile, *args: Any) -> None:
        state = args[0] if args and isinstance(args[0], ev.LoopState) else None
        self.fire(state)

    name = f"Hostile_{hook}"
    ns: dict[str, Any] = {"hook": hook, "__module__": __name__, "__qualname__": name}
    if hook != "on_step_end":
        ns[hook] = method
    cls = type(name, (Hostile,), ns)
    globals()[name] = cls  # pickled by reference: module.name
    return cls


HOSTILE = {
    hook: _hostile(hook)
    for hook in (
        "on_train_start",
        "on_step_end",
        "on_eval",
        "on_checkpoint",
        "on_train_end",
        "setup",
        "teardown",
        "flush",
    )
}


async def config_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    """The step a test config names (``tests.process_helpers:config_step``)."""
    return {"loss": 1.0 / (step_idx + 1)}


class Blocks(ev.Callback):
    """Notes its pid in setup and teardown; ``on_step_end`` computes for a while."""

    isolation = "process"

    def __init__(self, path: str, spin: float = 0.0) -> None:
        self.path, self.spin = path, spin

    def setup(self, state: ev.LoopState) -> None:
        note(self.path, hook="setup")

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        end = time.monotonic() + self.spin
        while time.monotonic() < end:
            pass

    def teardown(self, state: ev.LoopState) -> None:
        note(self.path, hook="teardown")
