"""The command line as a user runs it: `python -m evsys_async ...` in a subprocess."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # the command line in a subprocess


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COLUMNS")}


def cli(*args: str, cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evsys_async", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env(),
        timeout=timeout,
    )


def logged_envelopes(path: Path) -> list[dict[str, Any]]:
    """The envelopes of an events.jsonl as JSON, its header line(s) left out."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["format"] == "evsys-async/events"
    return [line for line in lines if "event" in line]


def assert_complete_files(run_dir: Path, status: str) -> None:
    """Every file parses whole; the manifest has the status and a clean callback report."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["split"] in ("train", "val") for line in lines)
    events = logged_envelopes(run_dir / "events.jsonl")
    assert events[-1]["event"]["type"] == "TrainEnded"
    assert events[-1]["event"]["status"] == status
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and rows[0]["step"] == "0"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == status
    for name, health in manifest["callback_report"].items():
        assert health["pending"] == 0 and not health["stuck"], name
    assert f"status: {status}" in (run_dir / "summary.md").read_text()


def test_run_without_config_is_the_demo(tmp_path: Path) -> None:
    proc = cli("run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("[1/200] loss=")
    evals = [line for line in out.splitlines() if " eval val: " in line]
    first = float(evals[0].split("pass_rate=")[1].split()[0])
    last = float(evals[-1].split("pass_rate=")[1].split()[0])
    assert last > first + 0.2  # pass_rate visibly rises
    assert "status: completed — 200 of 200 steps" in out
    assert "best eval: val/pass_rate = " in out
    # a sparkline per metric: the loss falls, the pass rate rises
    [loss] = [x for x in out.splitlines() if x.startswith("  loss ")]
    assert "→" in loss and loss.split()[1][0] in "█▇▆" and loss.split()[1][-1] in "▁▂"
    assert any(x.startswith("  val/pass_rate ") and "(best " in x for x in out.splitlines())
    assert f"files: {Path('runs') / 'demo'}/" in out
    assert "early_stopping  ok" in out
    assert_complete_files(tmp_path / "runs" / "demo", "completed")
    with open(tmp_path / "runs" / "demo" / "metrics.csv", newline="") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]
    assert sum(losses[-20:]) < sum(losses[:20]) / 2  # loss visibly falls


STEPS = """\
import anyio

async def step(state, step_idx):
    await anyio.lowlevel.checkpoint()
    return {"loss": 1.0 / (step_idx + 1), "lr": state.ctx.run_config["lr"]}

def failing(state, step_idx):
    if step_idx == 2:
        raise RuntimeError("diverged")
    return {"loss": 1.0}

async def interrupting(state, step_idx):
    if step_idx == 2:
        raise KeyboardInterrupt
    return {"loss": 1.0}

def exiting(state, step_idx):
    if step_idx == 2:
        raise SystemExit(3)
    return {"loss": 1.0}
"""

CONFIG = """\
name: mine
num_steps: 12
step: {step}
params: {{lr: 0.5}}
callbacks:
  - kind: print_progress
    params: {{every: 4}}
  - kind: csv_metrics
    params: {{out_path: metrics.csv}}
  - kind: local_logger
    params: {{print_every: 0}}
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_a_config_with_its_own_step(tmp_path: Path, backend: str) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mysteps.py").write_text(STEPS)  # beside the config, not in cwd
    (tmp_path / "conf" / "run.yaml").write_text(CONFIG.format(step="mysteps:step"))
    out_dir = tmp_path / "elsewhere"
    proc = cli(
        "run", "conf/run.yaml", "--backend", backend, "--output-dir", str(out_dir), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "[12/12] loss=0.0833 lr=0.5000" in proc.stdout
    assert "best eval: (no evals ran)" in proc.stdout
    assert_complete_files(out_dir / "mine", "completed")


def test_a_failed_step_exits_1(tmp_path: Path) -> None:
    (tmp_path / "mysteps.py").write_text(STEPS)
    (tmp_path / "run.yaml").write_text(CONFIG.format(step="mysteps:failing"))
    proc = cli("run", "run.yaml", cwd=tmp_path)
    assert proc.returncode == 1
    assert "RuntimeError: diverged" in proc.stderr
    assert "status: failed — 2 of 12 steps" in proc.stdout
    assert_complete_files(tmp_path / "runs" / "mine", "failed")


@pytest.mark.parametrize(("step", "code"), [("interrupting", 130), ("exiting", 3)])
def test_an_interrupt_from_the_step_prints_the_summary_and_exits_with_its_code(
    tmp_path: Path, step: str, code: int
) -> None:
    (tmp_path / "mysteps.py").write_text(STEPS)
    (tmp_path / "run.yaml").write_text(CONFIG.format(step=f"mysteps:{step}"))
    proc = cli("run", "run.yaml", cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert "status: cancelled — 2 of 12 steps" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert_complete_files(tmp_path / "runs" / "mine", "cancelled")


TYPO = """\
name: typo
num_steps: 10
callbacks:
  - kind: early_stopping
    params:
      metric: pass_rate
      patiense: 3
"""


def test_validate_catches_a_typo_in_callback_params(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(TYPO)
    proc = cli("validate", "run.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert (
        "run.yaml:7: callbacks[0].params.patiense (early_stopping): unknown field 'patiense' "
        "— did you mean 'patience'?"
    ) in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing ran
    (tmp_path / "run.yaml").write_text(TYPO.replace("patiense", "patience"))
    proc = cli("validate", "run.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ok: run.yaml: run 'typo', 10 steps" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_bad_config_and_bad_arguments_exit_2(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text('num_steps = "ten"\n')
    proc = cli("run", "run.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "run.toml: num_steps: expected int, got str 'ten'" in proc.stderr
    assert cli("run", "missing.yaml", cwd=tmp_path).returncode == 2
    proc = cli("run", "--backend", "curio", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'curio'" in proc.stderr
    assert cli(cwd=tmp_path).returncode == 2  # no command


def test_help_on_each_command(tmp_path: Path) -> None:
    for args in (["--help"], ["run", "--help"], ["validate", "--help"], ["callbacks", "--help"]):
        proc = cli(*args, cwd=tmp_path)
        assert proc.returncode == 0 and "usage: evsys-async" in proc.stdout
    assert "130 interrupted (SIGINT)" in " ".join(cli("--help", cwd=tmp_path).stdout.split())


def test_callbacks_lists_kinds_with_fields_types_defaults(tmp_path: Path) -> None:
    proc = cli("callbacks", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for kind in ("print_progress", "csv_metrics", "early_stopping", "local_logger"):
        assert f"\n{kind}  (evsys_async.callbacks." in out
    assert "  metric: str  (required)" in out
    assert "  patience: int = 3" in out
    proc = cli("evaluators", cwd=tmp_path)
    assert "demo_accuracy  (evsys_async.demo.DemoAccuracy)" in proc.stdout
    assert "  run_every: int = 20" in proc.stdout


# -- signals: the run stops cleanly, the files are complete -----------------------------------


SLOW = """\
name: slow
num_steps: 100000
step: demo
params: {delay: 0.005}
evaluators: [{kind: demo_accuracy, params: {run_every: 50}}]
callbacks:
  - kind: print_progress
    params: {every: 10}
  - kind: csv_metrics
    params: {out_path: metrics.csv}
  - kind: local_logger
    params: {print_every: 0}
"""


@pytest.mark.parametrize(
    ("backend", "sig", "code"),
    [
        ("asyncio", signal.SIGINT, 130),
        ("trio", signal.SIGINT, 130),
        ("asyncio", signal.SIGTERM, 143),
        ("trio", signal.SIGTERM, 143),
    ],
)
def test_signal_stops_cleanly_with_complete_files(
    tmp_path: Path, backend: str, sig: int, code: int
) -> None:
    (tmp_path / "slow.yaml").write_text(SLOW)
    proc = subprocess.Popen(
        [sys.executable, "-m", "evsys_async", "run", "slow.yaml", "--backend", backend],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # the run is under way once a progress line is out
    assert first.startswith("[1/100000] loss="), first
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == code, err
    assert f"{signal.Signals(sig).name} received" in err
    assert "status: cancelled" in out
    assert "Traceback" not in err
    assert_complete_files(tmp_path / "runs" / "slow", "cancelled")


def test_version_is_the_installed_distribution_version(tmp_path: Path) -> None:
    from importlib.metadata import version

    proc = cli("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"evsys-async {version('evsys-async')}"
    import evsys_async

    assert evsys_async.__version__ == version("evsys-async")


NON_FINITE = """\
import math

def step(state, step_idx):
    return {"loss": [math.nan, math.inf, -math.inf, 0.5][step_idx % 4]}
"""


def test_nan_and_inf_are_kept_the_same_way_in_every_file(tmp_path: Path) -> None:
    (tmp_path / "nf.py").write_text(NON_FINITE)
    (tmp_path / "run.yaml").write_text(
        "name: nf\nnum_steps: 8\nstep: nf:step\n"
        "callbacks:\n  - {kind: csv_metrics, params: {out_path: metrics.csv}}\n"
        "  - {kind: local_logger, params: {print_every: 0}}\n"
    )
    proc = cli("run", "run.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "nf"
    expected = ["nan", "inf", "-inf", 0.5] * 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["metrics"]["loss"] for r in rows] == expected
    with open(run_dir / "metrics.csv", newline="") as f:
        assert [r["loss"] for r in csv.DictReader(f)] == [str(v) for v in expected]
    events = [e["event"] for e in logged_envelopes(run_dir / "events.jsonl")]
    assert [e["metrics"]["loss"] for e in events if e["type"] == "StepEnded"] == expected
    assert all(isinstance(float(v), float) for v in expected)  # float() reads each back


# -- a failed step: the user's traceback on stderr and in the run dir ------------------------

FAILING = """\
def helper(step_idx):
    if step_idx == 2:
        raise RuntimeError("nan in grads")
    return 1.0

def step(state, step_idx):
    return {"loss": helper(step_idx)}
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_failed_step_shows_the_users_traceback_and_keeps_it(tmp_path: Path, backend: str) -> None:
    (tmp_path / "boom.py").write_text(FAILING)
    (tmp_path / "run.yaml").write_text(
        "name: boom\nnum_steps: 5\nstep: boom:step\n"
        "callbacks: [{kind: local_logger, params: {print_every: 0}}]\n"
    )
    proc = cli("run", "run.yaml", "--backend", backend, cwd=tmp_path)
    assert proc.returncode == 1
    err = proc.stderr
    assert "Traceback (most recent call last):" in err
    assert 'boom.py", line 7, in step' in err and 'boom.py", line 3, in helper' in err
    assert "RuntimeError: nan in grads" in err
    # the user's frames, not the runtime's
    assert "evsys_async" not in err.split("Traceback")[1].split("RuntimeError")[0]
    assert "anyio" not in err and "trio" not in err.split("--backend")[0]
    run_dir = tmp_path / "runs" / "boom"
    assert (
        f"the run failed: RuntimeError: nan in grads (kept in {Path('runs') / 'boom' / 'error.txt'})"
        in err
    )
    kept = (run_dir / "error.txt").read_text()
    assert 'boom.py", line 3, in helper' in kept and kept.rstrip().endswith(
        "RuntimeError: nan in grads"
    )
    summary = (run_dir / "summary.md").read_text()
    assert "## Traceback" in summary and 'boom.py", line 3, in helper' in summary


DEBUG_RUN = """\
name: dbg
num_steps: 2
step: demo
callbacks: [{kind: debug_logger}]
"""


def test_verbose_and_log_level_show_the_librarys_log(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(DEBUG_RUN)
    quiet = cli("run", "run.yaml", cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "hook: callback=DebugLoggerCallback hook=on_train_start" not in quiet.stderr
    for args in (["-vv", "run", "run.yaml"], ["run", "run.yaml", "--log-level", "debug"]):
        proc = cli(*args, "--overwrite", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert (
            "DEBUG evsys_async: hook: callback=DebugLoggerCallback hook=on_train_start"
            in proc.stderr
        )
    proc = subprocess.run(
        [sys.executable, "-m", "evsys_async", "run", "run.yaml", "--overwrite"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env(), "EVSYS_LOG_LEVEL": "debug"},
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hook=on_step_end" in proc.stderr
    proc = cli("run", "run.yaml", "--log-level", "loud", cwd=tmp_path)
    assert proc.returncode == 2 and "'loud' is not a log level; use one of DEBUG" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "evsys_async", "validate", "run.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env(), "EVSYS_LOG_LEVEL": "loud"},
        timeout=90,
    )
    assert proc.returncode == 2 and "$EVSYS_LOG_LEVEL: 'loud' is not a log level" in proc.stderr


# -- a closed stdout ----------------------------------------------------------------------------


def read_then_close(args: list[str], lines: int, cwd: Path) -> tuple[list[bytes], int, str]:
    """Read ``lines`` lines of the command's stdout, then close it, as ``| head`` does."""
    with subprocess.Popen(
        [sys.executable, "-m", "evsys_async", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        head = [proc.stdout.readline() for _ in range(lines)]
        proc.stdout.close()
        err = proc.stderr.read().decode()
        return head, proc.wait(timeout=90), err


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path: Path) -> None:
    """`evsys-async run | head -2` and `evsys-async callbacks | head -1`."""
    head, code, err = read_then_close(["run"], 2, tmp_path)
    assert head[0].startswith(b"[1/200] loss=")
    assert code == 0, err
    assert (
        "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err
    )
    assert_complete_files(tmp_path / "runs" / "demo", "completed")  # the run went on to its end
    head, code, err = read_then_close(["callbacks"], 1, tmp_path)
    assert head[0].endswith(b"callback kind(s):\n")
    assert code == 0 and err == "", err


# -- a missing extra ----------------------------------------------------------------------------


def test_a_missing_extra_is_one_line_exit_2_with_the_install_command(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(
        "name: tb\nnum_steps: 3\nstep: demo\ncallbacks:\n  - kind: tensorboard_logger\n"
    )
    without_tensorboardx = (
        "import sys; sys.modules['tensorboardX'] = None\n"  # as if it were not installed
        "from evsys_async.cli import main; main(sys.argv[1:])\n"
    )
    for command in ("validate", "run"):
        proc = subprocess.run(
            [sys.executable, "-c", without_tensorboardx, command, "run.yaml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env(),
            timeout=90,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr  # one line
        assert proc.stderr.startswith(
            "evsys-async: bad config: run.yaml:5: callbacks[0] (tensorboard_logger): "
        )
        assert "pip install 'evsys-async[tensorboard]'" in proc.stderr
    assert not (tmp_path / "runs").exists()


# -- the summary: names, steps and numbers as people read them ---------------------------------

COALESCING = """\
import threading
import evsys_async as ev

released = threading.Event()

@ev.register_callback("slow_bar")
class SlowBar(ev.Callback):
    policy = ev.Latest()  # keeps the newest step, like the progress bar on a terminal

    def on_step_end(self, state, step_idx, batch, metrics):
        if step_idx == 0:
            released.wait(30)  # held while the other steps are published

def step(state, step_idx):
    if step_idx == state.num_steps - 1:
        released.set()
    return {"loss": 1.0 / (step_idx + 1)}
"""


def test_the_summary_says_coalesced_by_design_and_hides_its_own_tracker(tmp_path: Path) -> None:
    (tmp_path / "bar.py").write_text(COALESCING)
    (tmp_path / "run.yaml").write_text(
        "name: bar\nnum_steps: 50\nstep: bar:step\ncallbacks: [{kind: slow_bar}]\n"
        "evaluators: [{kind: demo_accuracy, params: {run_every: 10}}]\n"
    )
    proc = cli("run", "run.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("  slow_bar")]
    assert "coalesced (by design" in line and "dropped" not in line and line.split()[1] == "ok"
    manifest = json.loads((tmp_path / "runs" / "bar" / "manifest.json").read_text())
    # reported under its registered name; the CLI's eval tracker is not a callback
    assert list(manifest["callback_report"]) == ["slow_bar"]
    assert manifest["callback_report"]["slow_bar"]["coalesced"] >= 1


def test_steps_count_from_1_and_eval_names_match_the_files(tmp_path: Path) -> None:
    proc = cli("run", "--num-steps", "40", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [best] = [x for x in proc.stdout.splitlines() if x.startswith("best eval: ")]
    name, rest = best.removeprefix("best eval: ").split(" = ")
    value, how = rest.split(" ", 1)
    assert name == "val/pass_rate" and len(value.split(".")[1]) == 4  # as the progress line prints
    step = int(how.removeprefix("(max, step ").rstrip(")"))
    run_dir = tmp_path / "runs" / "demo"
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["val/pass_rate"]]  # the same name in the CSV
    best_row = max(rows, key=lambda r: float(r["val/pass_rate"]))
    assert int(best_row["step"]) + 1 == step  # files count from 0, people from 1
    assert (
        f"| val/pass_rate | {step if step == 40 else 40} |" in (run_dir / "summary.md").read_text()
    )


# -- bad files: one placed line, exit 2, no hang ------------------------------------------------

BOMB = "name: bomb\nnum_steps: 10\na: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{x}: &{x} [{', '.join([f'*{p}'] * 9)}]\n" for p, x in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b"\x7fELF\x02\x01\x01\xff\xfe\x00\x00binary",
            "bad.yaml:1: byte 0xff at column 8 is not UTF-8 text",
        ),
        (b"name: x\nnum_steps: 3\x00\n", "bad.yaml:2: a NUL byte at column 13"),
        (BOMB.encode(), "bad.yaml:8: f: its aliases expand to more than 100,000 values"),
        (
            b"name: x\nnum_steps: 3\nparams: &p {a: [*p]}\n",
            "bad.yaml:3: params.a[0]: an alias refers to",
        ),
        (
            b"name: x\nnum_steps: 3\ndrain_timeout: 1e-308x\n",
            "bad.yaml:3: drain_timeout: expected float",
        ),
        (
            b"name: x\nnum_steps: 3\nparams:\n  dealy: 0.01\n",
            "bad.yaml:4: params.dealy: unknown field 'dealy' — did you mean 'delay'? (step "
            "'demo' takes: lr, batch_size, n_features, n_train, n_test, noise, delay)",
        ),
    ],
    ids=["binary", "nul", "alias-bomb", "recursive-alias", "not-a-number", "demo-param-typo"],
)
def test_a_bad_file_is_one_placed_line_and_exit_2(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    (tmp_path / "bad.yaml").write_bytes(content)
    for command in ("validate", "run"):
        proc = cli(command, "bad.yaml", cwd=tmp_path, timeout=30)  # the bomb took minutes
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"evsys-async: bad config: {expected}"), proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_yaml_floats_with_an_exponent_and_anchors_read_as_written(tmp_path: Path) -> None:
    (tmp_path / "ok.yaml").write_text(
        "name: x\nnum_steps: 3\ndrain_timeout: 1e308\ncontrol_timeout: 2.5E+1\n"
        "params: &shared {lr: 1e-3, batch_size: 8}\n"
    )
    from evsys_async.config import load_config

    config = load_config(tmp_path / "ok.yaml")
    assert config.drain_timeout == 1e308 and config.control_timeout == 25.0  # type: ignore[union-attr]
    assert config.params == {"lr": 0.001, "batch_size": 8}  # type: ignore[union-attr]
    (tmp_path / "exp.yaml").write_text(
        "name: sweep\nrun: {num_steps: 3, params: &base {lr: 0.1, n_train: 100}}\n"
        "arms:\n  a: {params: *base}\n  b: {params: {<<: *base, lr: 0.2}}\n"
    )
    proc = cli("validate", "exp.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "arms a, b" in proc.stdout


# -- W&B from the command line ------------------------------------------------------------------


def wandb_env(tmp_path: Path, mode: str) -> dict[str, str]:
    home = tmp_path / "wandb-home"
    home.mkdir(exist_ok=True)
    out = {k: v for k, v in env().items() if not k.startswith("WANDB_")}
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        out[var] = str(home)
    out.update(HOME=str(home), WANDB_MODE=mode, WANDB_SILENT="true", WANDB_DISABLE_GIT="true")
    return out


WANDB_RUN = """\
name: wb
num_steps: 4
step: demo
evaluators: [{kind: demo_accuracy, params: {run_every: 2}}]
callbacks: [{kind: wandb_logger}]
"""


def test_wandb_mode_comes_from_the_environment_and_a_disabled_logger_says_so(
    tmp_path: Path,
) -> None:
    (tmp_path / "run.yaml").write_text(WANDB_RUN)
    proc = subprocess.run(
        [sys.executable, "-m", "evsys_async", "run", "run.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=wandb_env(tmp_path, "offline"),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("  wandb_logger")]
    assert line.split()[1] == "ok", line  # WANDB_MODE=offline: no API key needed
    assert list((tmp_path / "runs" / "wb" / "wandb").glob("offline-run-*"))
    # a logger that switched itself off says so, in the summary and in the manifest
    proc = subprocess.run(
        [sys.executable, "-m", "evsys_async", "run", "run.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=wandb_env(tmp_path, "no-such-mode"),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("  wandb_logger")]
    assert "disabled: wandb init failed: " in line and " ok " not in line, line
    run_dir = tmp_path / "runs" / "wb-1"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["callback_report"]["wandb_logger"]["disabled"].startswith("wandb init failed")


# -- early stopping on a metric that never appears ----------------------------------------------

TYPO_METRIC = """\
name: typo
num_steps: 40
step: demo
evaluators: [{kind: demo_accuracy, params: {run_every: 10}}]
callbacks:
  - kind: early_stopping
    params: {metric: accuracy, eval_name: val%s}
"""


def test_early_stopping_on_a_metric_that_never_appears(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text(TYPO_METRIC % "")
    proc = cli("run", "run.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # a warning by default
    [warning] = [x for x in proc.stderr.splitlines() if "early_stopping" in x]
    assert warning.startswith("WARNING evsys_async: early_stopping: metric 'accuracy' is not among")
    assert "at step 10 (metrics seen: loss, pass_rate)" in warning
    assert "status: completed" in proc.stdout
    (tmp_path / "run.yaml").write_text(TYPO_METRIC % ", strict: true")
    proc = cli("run", "run.yaml", cwd=tmp_path)
    assert proc.returncode == 1  # strict: the run fails
    assert "status: failed — 20 of 40 steps" in proc.stdout
    assert "stop reason: early_stopping: metric 'accuracy' never appeared in 2 evals" in proc.stdout


# -- run directories ----------------------------------------------------------------------------


def test_rerunning_a_config_is_a_new_run_and_overwrite_reuses_the_dir(tmp_path: Path) -> None:
    (tmp_path / "mysteps.py").write_text(STEPS)
    (tmp_path / "run.yaml").write_text(CONFIG.format(step="mysteps:step"))
    first = cli("run", "run.yaml", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert f"files: {Path('runs') / 'mine'}/ " in first.stdout
    assert "holds another run's files" not in first.stdout
    csv_before = (tmp_path / "runs" / "mine" / "metrics.csv").read_text()
    second = cli("run", "run.yaml", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"files: {Path('runs') / 'mine-1'}/ " in second.stdout
    assert (
        f"(a new run dir: {Path('runs') / 'mine'}/ holds another run's files; --overwrite reuses it)"
        in second.stdout
    )
    assert (tmp_path / "runs" / "mine" / "metrics.csv").read_text() == csv_before  # untouched
    assert_complete_files(tmp_path / "runs" / "mine-1", "completed")
    events = logged_envelopes(tmp_path / "runs" / "mine-1" / "events.jsonl")
    assert {e["event"]["run_key"] for e in events} == {"mine-1"}
    (tmp_path / "runs" / "mine" / "stale.txt").write_text("x")
    third = cli("run", "run.yaml", "--overwrite", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert f"files: {Path('runs') / 'mine'}/ " in third.stdout
    assert not (tmp_path / "runs" / "mine" / "stale.txt").exists()  # started afresh
    assert not (tmp_path / "runs" / "mine-2").exists()


# -- the end-of-run summary, as printed ---------------------------------------------------


def test_health_lines_name_every_problem() -> None:
    from evsys_async.cli._summary import health_line
    from evsys_async.state import CallbackHealth, Degraded

    def h(**kw: Any) -> CallbackHealth:
        return CallbackHealth(**{"delivered": 50, "failed": 0, "dropped": 0, "pending": 0, **kw})

    assert health_line(h()) == "ok (50 events)"
    assert health_line(h(failed=3)) == "3 failed (50 events)"
    assert health_line(h(hook_failures={"setup": 1, "flush": 2})) == (
        "hook failures: flush 2, setup 1 (50 events)"
    )
    line = health_line(h(disabled="setup failed: ConnectionError: refused", dropped=50))
    assert line.startswith("disabled: setup failed: ConnectionError: refused; 50 dropped")
    lost = Degraded("metrics.csv: OSError: [Errno 28] No space left", 2501, 488)
    assert health_line(h(degraded=lost)) == (
        "degraded: metrics.csv: OSError: [Errno 28] No space left; 2,501 rows lost from step 489"
        " (50 events)"
    )
    assert " ok" not in health_line(h(degraded=Degraded("summary.md not written")))


def test_the_summary_prints_sparklines_failed_evals_and_the_whole_run(tmp_path: Path) -> None:
    import io

    import anyio

    from evsys_async.cli._summary import EvalTracker, print_summary
    from evsys_async.events import EvalEnded, StepEnded, TrainStarted
    from evsys_async.state import EvalTally, LoopArtifacts

    tracker = EvalTracker(None)

    async def feed() -> None:
        await tracker(TrainStarted(num_steps=50, start_step=30))
        for i in range(30, 50):
            await tracker(StepEnded(step=i, num_steps=50, metrics={"loss": 1.0 / (i + 1)}))
        for i in (39, 49):
            await tracker(EvalEnded(step=i, eval_name="val", metrics={"acc": i / 100}))

    anyio.run(feed)
    artifacts = LoopArtifacts(
        run_dir=tmp_path,
        total_requested_steps=50,
        steps_completed=20,
        start_step=30,
        status="completed",
        evals={
            "val": EvalTally(runs=2, failed=0),
            "remote": EvalTally(runs=20, failed=2, first_error="HTTP 422: bad payload"),
        },
    )
    out = io.StringIO()
    print_summary(artifacts, tracker, out, requested=tmp_path.name)
    text = out.getvalue()
    assert "status: completed — 50 of 50 steps (resumed at step 31)" in text
    assert "best eval: val/acc = 0.4900 (max, step 50)" in text
    assert "  remote: 2 of 20 evals failed: HTTP 422: bad payload" in text
    assert "  val:" not in text  # no failures, no line
    [loss] = [x for x in text.splitlines() if x.startswith("  loss ")]
    assert "█" in loss and "▁" in loss and "0.0323 → 0.0200" in loss
    [acc] = [x for x in text.splitlines() if x.startswith("  val/acc")]
    assert "(best 0.4900 at step 50)" in acc


RESUMABLE = """\
import json
import os
from pathlib import Path


def step(state, step_idx):
    if state.model is None:  # the first step of this process: a fresh model, or the saved one
        state.model = 0.0
        if state.start_step:
            rows = (state.run_dir / "checkpoints.jsonl").read_text().splitlines()
            state.model = json.loads(Path(json.loads(rows[-1])["path"]).read_text())["w"]
    if step_idx == int(os.environ.get("FAIL_AT", "-1")):
        raise RuntimeError("boom")
    state.model = state.model * 0.9 + step_idx
    return {"w": state.model}


def save(state, name):
    path = state.run_dir / f"ckpt-{name}.json"
    path.write_text(json.dumps({"w": state.model}))
    return str(path)
"""

RESUMABLE_CONFIG = """\
name: r
num_steps: 10
step: resumable:step
checkpoint: resumable:save
save_every: 3
callbacks:
  - {kind: csv_metrics, params: {out_path: metrics.csv}}
  - {kind: local_logger, params: {print_every: 0}}
"""


def test_resume_continues_from_the_last_checkpoint_as_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    """A run that failed at step 8 (1-based), resumed with --resume: the same files as a
    run that never failed; the summary counts the whole run; bad resumes are one line."""
    (tmp_path / "resumable.py").write_text(RESUMABLE)
    (tmp_path / "r.yaml").write_text(RESUMABLE_CONFIG)
    whole = cli("run", "r.yaml", "--output-dir", "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    failed = subprocess.run(
        [sys.executable, "-m", "evsys_async", "run", "r.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**env(), "FAIL_AT": "7"},
        timeout=90,
    )
    assert failed.returncode == 1, failed.stderr
    resumed = cli("run", "r.yaml", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming runs/r at step 8 of 10" in resumed.stderr
    assert "10 of 10 steps (resumed at step 8)" in resumed.stdout
    run_dir = tmp_path / "runs" / "r"
    assert (run_dir / "metrics.csv").read_text() == (tmp_path / "whole/r/metrics.csv").read_text()
    rows = [json.loads(x) for x in (run_dir / "checkpoints.jsonl").read_text().splitlines()]
    assert [(r["name"], r["resume_step"]) for r in rows] == [
        ("step_3", 3),
        ("step_6", 6),
        ("interrupted", 7),
        ("step_9", 9),
        ("final", 10),
    ]
    # a finished run, a dir that is not there, one without checkpoints: exit 2, one line
    for args, words in (
        (["--resume"], "runs/r's last checkpoint is after step 10 of 10: nothing is left"),
        (["--resume", "runs/nope"], "--resume: no run directory runs/nope"),
        (["--resume", "whole/r", "--overwrite"], "--overwrite (or overwrite: true) would"),
        (["--start-step", "3"], "--start-step K goes with --resume"),
    ):
        done = cli("run", "r.yaml", *args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert words in done.stderr and done.stderr.count("\n") == 1, done.stderr
    (tmp_path / "plain.yaml").write_text("name: p\nnum_steps: 3\nparams: {delay: 0}\n")
    assert cli("run", "plain.yaml", cwd=tmp_path).returncode == 0
    done = cli("run", "plain.yaml", "--resume", cwd=tmp_path)
    assert done.returncode == 2 and "runs/p has no checkpoint to resume from" in done.stderr
    # train on past the end: RUN_DIR given, the config after --resume, more steps
    done = cli("run", "--resume", "r.yaml", "--num-steps", "12", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "12 of 12 steps (resumed at step 11)" in done.stdout
    steps = [r.split(",")[0] for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(12)]
    # --start-step K: from step K (1-based) whatever the checkpoints say
    done = cli(
        "run", "r.yaml", "--resume", "runs/r", "--start-step", "12", "--num-steps", "12",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "12 of 12 steps (resumed at step 12)" in done.stdout


BLOCKER = """\
import os
import sys

ABSENT = set(filter(None, os.environ.get("EVSYS_TEST_ABSENT", "").split(",")))


class Hiding:
    \"\"\"A finder that finds nothing of $EVSYS_TEST_ABSENT and defers the rest: with every
    finder wrapped, those modules look not installed (find_spec says None).\"\"\"

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
"""


@pytest.mark.parametrize(
    ("section", "absent", "where", "extra"),
    [
        (
            "transports:\n  - kind: redis\n    params: {url: 'redis://127.0.0.1:6379/0'}\n",
            "redis",
            "run.yaml:4: transports[0] (redis): the Redis transport (redis) needs",
            "redis",
        ),
        (
            "coordinator:\n  kind: redis\n  params: {url: 'redis://127.0.0.1:6379/0'}\n",
            "redis",
            "run.yaml:3: coordinator (redis): the Redis coordinator (redis) needs",
            "redis",
        ),
        ("callbacks:\n  - {kind: wandb_logger}\n", "wandb", "run.yaml:4: callbacks[0]", "wandb"),
        ("callbacks:\n  - {kind: mlflow}\n", "mlflow", "run.yaml:4: callbacks[0]", "mlflow"),
        (
            "callbacks:\n  - {kind: tensorboard_logger}\n",
            "tensorboardX",
            "run.yaml:4: callbacks[0]",
            "tensorboard",
        ),
    ],
    ids=["redis-transport", "redis-coordinator", "wandb", "mlflow", "tensorboard"],
)
def test_validate_names_a_missing_extra_with_its_place_and_install_command(
    tmp_path: Path, section: str, absent: str, where: str, extra: str
) -> None:
    """The extra hidden by meta-path finders in a sitecustomize, as if not installed
    (the checker itself is not touched): validate and run say it in one line, exit 2."""
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    (tmp_path / "run.yaml").write_text("name: x\nnum_steps: 3\n" + section)
    absent_env = {**env(), "PYTHONPATH": str(tmp_path / "blocker"), "EVSYS_TEST_ABSENT": absent}
    for command in ("validate", "run"):
        proc = subprocess.run(
            [sys.executable, "-m", "evsys_async", command, "run.yaml"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=absent_env,
            timeout=90,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"evsys-async: bad config: {where}"), proc.stderr
        assert f"needs the optional dependency '{absent}'" in proc.stderr
        assert f"pip install 'evsys-async[{extra}]'" in proc.stderr
    assert not (tmp_path / "runs").exists()
    # the same config with the extra present: validate says ok
    proc = subprocess.run(
        [sys.executable, "-m", "evsys_async", "validate", "run.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env(),
        timeout=90,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ok: run.yaml"), proc.stderr
