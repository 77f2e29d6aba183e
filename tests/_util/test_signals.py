"""SIGINT/SIGTERM cancel the run's scope so the shutdown runs; a second
signal leaves at once. Signals go to real subprocesses; nothing here sleeps to order."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anyio
import pytest

from evsys_async._util.signals import Interrupted, handled_signals, run_with_signals

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SCRIPT = textwrap.dedent(
    """
    import sys, anyio
    from evsys_async._util.signals import Interrupted, run_with_signals

    hang_in_cleanup = sys.argv[2] == "hang"

    async def main():
        try:
            print("ready", flush=True)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                print("cleaning", flush=True)
                if hang_in_cleanup:
                    await anyio.Event().wait()   # a shutdown that never ends
                await anyio.lowlevel.checkpoint()
                print("cleanup done", flush=True)

    try:
        run_with_signals(main, backend=sys.argv[1])
    except Interrupted as exc:
        print(f"interrupted {exc.signum} {exc.exit_code}", flush=True)
        sys.exit(exc.exit_code)
    """
)


def start(tmp_path: Path, backend: str, mode: str = "clean") -> subprocess.Popen[str]:
    script = tmp_path / "main.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), backend, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"  # the receiver is installed before main runs
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_cancels_main_and_its_shutdown_runs(
    tmp_path: Path, backend: str, sig: int, code: int
) -> None:
    proc = start(tmp_path, backend)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert out.splitlines() == ["cleaning", "cleanup done", f"interrupted {int(sig)} {code}"]
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_second_signal_exits_at_once(tmp_path: Path, backend: str) -> None:
    proc = start(tmp_path, backend, "hang")
    assert proc.stdout is not None
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "cleaning\n"  # stuck in its shutdown now
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "cleanup done" not in out


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_returns_the_value_and_raises_the_error(backend: str) -> None:
    async def ok() -> int:
        await anyio.lowlevel.checkpoint()
        return 42

    async def bad() -> int:
        raise ValueError("boom")

    assert run_with_signals(ok, backend=backend) == 42
    with pytest.raises(ValueError, match="boom"):
        run_with_signals(bad, backend=backend)


def test_outside_the_main_thread_it_just_runs() -> None:
    async def ok() -> str:
        return "ran"

    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(run_with_signals(ok)))
    thread.start()
    thread.join(30)
    assert result == ["ran"]


def test_interrupted_is_a_keyboard_interrupt_with_exit_codes() -> None:
    assert issubclass(Interrupted, KeyboardInterrupt)
    assert Interrupted(signal.SIGINT).exit_code == 130
    assert Interrupted(signal.SIGTERM).exit_code == 143
    assert signal.SIGTERM in handled_signals()


def test_loop_run_sync_uses_it(tmp_path: Path) -> None:
    import evsys_async as ev

    def step(state: ev.LoopState, i: int) -> dict[str, float]:
        return {"loss": 1.0 / (i + 1)}

    artifacts = ev.TrainingLoop(step, num_steps=3, output_dir=tmp_path).run_sync(backend="trio")
    assert artifacts.status == "completed" and artifacts.steps_completed == 3
