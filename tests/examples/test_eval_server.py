"""examples/eval_server.py: the eval server and the training share one event loop;
background evals come back over loopback HTTP while the steps go on (asyncio and trio)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from tests.servers import load_example

pytestmark = pytest.mark.slow  # the example serves HTTP on a socket

ROOT = Path(__file__).resolve().parents[2]


example = load_example("eval_server")


class Progress(ev.Callback):
    """Records steps and evals in delivery order; lets a waiter wait for a step."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []
        self.reached = -1
        self.waiters: list[tuple[int, anyio.Event]] = []

    async def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, m: Any) -> None:
        self.seen.append(("step", step_idx))
        self.reached = step_idx
        for target, event in self.waiters:
            if step_idx >= target:
                event.set()

    async def on_eval(self, state: ev.LoopState, step_idx: int, name: str, metrics: Any) -> None:
        self.seen.append(("eval", step_idx))

    async def wait_for(self, step: int) -> None:
        if self.reached >= step:
            return
        event = anyio.Event()
        self.waiters.append((step, event))
        await event.wait()


@pytest.mark.anyio
async def test_background_evals_over_http_while_training_goes_on(
    tmp_path: Path, anyio_backend: str
) -> None:
    num_steps, lead = 40, 3
    progress = Progress()
    scored: list[tuple[int, float]] = []

    async def scorer(weight: float, step: int) -> dict[str, float]:
        # the server answers only once training has gone `lead` steps past the
        # evaluated one: an inline eval would never get there (fail_after ends it)
        await progress.wait_for(min(step + lead, num_steps - 1))
        scored.append((step, weight))
        return {"loss": (weight - example.TARGET) ** 2, "close": 0.0}

    with anyio.fail_after(60):
        artifacts = await example.main(
            anyio_backend,
            num_steps=num_steps,
            output_dir=str(tmp_path),
            scorer=scorer,
            callbacks=[progress],
        )
    assert (artifacts.status, artifacts.steps_completed) == ("completed", num_steps)
    evals = [s for kind, s in progress.seen if kind == "eval"]
    assert evals == [9, 19, 29, 39]  # every due step, in order
    assert [s for s, _ in scored] == evals
    # the weight the server scored is the snapshot at the evaluated step, not a later one
    weights = [w for _, w in scored]
    assert weights == sorted(weights) and all(0 < w < example.TARGET for w in weights)
    for step in evals[:-1]:
        assert progress.seen.index(("eval", step)) > progress.seen.index(("step", step + lead))
    assert (artifacts.run_dir / "manifest.json").exists()


def test_the_example_runs_as_a_script(tmp_path: Path) -> None:
    for backend in ("asyncio", "trio"):
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "eval_server.py"), "--steps", "20",
             "--backend", backend],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        lines = out.stdout.splitlines()
        assert [line.split("]")[0] for line in lines[:2]] == [
            "[eval of step 10",
            "[eval of step 20",
        ]
        assert lines[-1].startswith("completed 20")


@pytest.mark.parametrize(
    ("backend", "sig"), [("asyncio", "SIGINT"), ("trio", "SIGINT"), ("asyncio", "SIGTERM")]
)
def test_the_eval_server_runs_alone_on_a_port_and_stops_cleanly(backend: str, sig: str) -> None:
    """``python examples/eval_server.py --port N``: prints its URL, answers POST /eval
    (queried with httpx), and Ctrl-C or SIGTERM stops it gracefully, exit 0."""
    import os
    import select
    import signal

    import httpx

    from tests.servers import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "eval_server.py"), "--port", str(port),
         "--backend", backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the server printed nothing"
        url = f"http://127.0.0.1:{port}/eval"
        assert proc.stdout.readline() == f"eval server: POST {url} (Ctrl-C stops it)\n"
        reply = httpx.post(url, json={"step": 9, "weight": 2.5}, timeout=30)
        assert reply.status_code == 200
        assert reply.json() == {"metrics": {"loss": 0.25, "close": 0.0}, "step": 9}
        bad = httpx.post(url, json={"step": 9}, timeout=30)
        assert bad.status_code == 422
        proc.send_signal(getattr(signal, sig))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out == f"{sig}: stopping\n" and "Traceback" not in err
