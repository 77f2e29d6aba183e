"""``evsys-async replay`` (``cli/_replay.py``): a run recorded through the command line,
replayed into callbacks from a file; what it prints, its options and its exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COLUMNS")}
    return subprocess.run(
        [sys.executable, "-m", "evsys_async", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    """A run recorded through the CLI: runs/demo/ with its events.jsonl."""
    done = cli("run", "--num-steps", "40", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / "runs" / "demo"


CALLBACKS = {
    "cbs.yaml": "- kind: csv_metrics\n  params: {out_path: metrics.csv}\n",
    "cbs.json": '[{"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}}]',
    "cbs.toml": '[[callbacks]]\nkind = "csv_metrics"\nparams = {out_path = "metrics.csv"}\n',
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_cli_replays_a_run_dir_into_a_new_one(recorded: Path, name: str) -> None:
    root = recorded.parent.parent
    (root / name).write_text(CALLBACKS[name])
    done = cli("replay", "runs/demo", "--callbacks", name, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "replayed " in done.stdout and "runs/demo-1/ (metrics.csv)" in done.stdout
    assert "csv_metrics  ok" in done.stdout
    replayed = (root / "runs" / "demo-1" / "metrics.csv").read_text()
    assert replayed == (recorded / "metrics.csv").read_text()


@pytest.mark.slow
def test_cli_only_speed_and_output_dir(recorded: Path) -> None:
    root = recorded.parent.parent
    (root / "cbs.yaml").write_text(CALLBACKS["cbs.yaml"])
    done = cli(
        "replay", str(recorded / "events.jsonl"), "--callbacks", "cbs.yaml",
        "--only", "EvalEnded", "--speed", "1000", "--output-dir", "elsewhere", cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "left out" in done.stdout
    rows = (root / "elsewhere" / "demo" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,val/") and len(rows) == 1 + 2  # evals at steps 20, 40
    bad = cli("replay", "runs/demo", "--callbacks", "cbs.yaml", "--speed", "0", cwd=root)
    assert bad.returncode == 2 and "is not a speed; give a number > 0" in bad.stderr


@pytest.mark.slow
def test_cli_bad_callbacks_file_is_placed(recorded: Path) -> None:
    root = recorded.parent.parent
    (root / "cbs.yaml").write_text(
        "- kind: csv_metrics\n  params: {out_path: m.csv}\n"
        "- kind: local_logger\n  params:\n    print_evry: 0\n"
    )
    done = cli("replay", "runs/demo", "--callbacks", "cbs.yaml", cwd=root)
    assert done.returncode == 2
    assert (
        "cbs.yaml:5: callbacks[1].params.print_evry (local_logger): unknown field 'print_evry'"
        " — did you mean 'print_every'?"
    ) in done.stderr
    assert "Traceback" not in done.stderr
    assert not (root / "runs" / "demo-1").exists()


@pytest.mark.slow
def test_cli_bad_input_exit_codes(recorded: Path) -> None:
    root = recorded.parent.parent
    (root / "cbs.yaml").write_text(CALLBACKS["cbs.yaml"])
    log = recorded / "events.jsonl"
    lines = log.read_bytes().splitlines()

    def replay(*extra: str) -> subprocess.CompletedProcess[str]:
        return cli("replay", "bad.jsonl", "--callbacks", "cbs.yaml", *extra, cwd=root)

    # a malformed line: stops, naming file and line; --skip-bad reads on and lists it
    bad = [*lines[:3], b'{"bus_id": 1}', *lines[3:]]
    (root / "bad.jsonl").write_bytes(b"\n".join(bad) + b"\n")
    done = replay()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bad event log: bad.jsonl:4: malformed envelope" in done.stderr
    done = replay("--skip-bad")
    assert done.returncode == 0, done.stderr
    assert "skipped line 4: malformed envelope" in done.stdout
    # a truncated last line: reported and skipped, not an error
    (root / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n" + lines[5][:30])
    done = replay()
    assert done.returncode == 0, done.stderr
    assert f"skipped line {len(lines) + 1}: truncated" in done.stdout
    # a newer format version
    newer = [lines[0].replace(b'"version":1', b'"version":7'), *lines[1:]]
    (root / "bad.jsonl").write_bytes(b"\n".join(newer) + b"\n")
    done = replay("--skip-bad")
    assert done.returncode == 2 and "format version is 7" in done.stderr
    # an unknown event type: delivered, said, not an error
    spike = b'{"bus_id":"b","seq":0,"event":{"type":"LossSpike","ts":1.0,"run_key":"demo"}}'
    (root / "bad.jsonl").write_bytes(b"\n".join([*lines[:3], spike, *lines[3:]]) + b"\n")
    done = replay()
    assert done.returncode == 0, done.stderr
    assert "unknown event type 'LossSpike' (1)" in done.stdout
    # a missing source, an unknown --only type
    done = cli("replay", "runs/nope", "--callbacks", "cbs.yaml", cwd=root)
    assert done.returncode == 2 and "no such event log or run directory: runs/nope" in done.stderr
    done = replay("--only", "EvalEnd")
    assert done.returncode == 0, done.stderr
    assert "--only EvalEnd: no event of this type in the log — did you mean 'EvalEnded'?" in (
        done.stdout
    )


@pytest.mark.slow
def test_cli_exits_1_when_a_callback_fails(recorded: Path) -> None:
    root = recorded.parent.parent
    (root / "failing.py").write_text(
        "import evsys_async as ev\n"
        "@ev.register_callback('failing')\n"
        "class Failing(ev.Callback):\n"
        "    def on_step_end(self, state, step_idx, batch, metrics):\n"
        "        raise RuntimeError('boom')\n"
    )
    (root / "cbs.yaml").write_text("- kind: failing\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COLUMNS")}
    code = "import failing, sys; from evsys_async.cli import main; main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, "replay", "runs/demo", "--callbacks", "cbs.yaml"],
        cwd=root,
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(root)},
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "failing  40 failed" in done.stdout


@pytest.mark.slow
def test_cli_deep_lines_and_duplicates(recorded: Path) -> None:
    """A 10,000-deep value (mid-log, or an unterminated last line of ``[``): one line
    naming file:line and --skip-bad, exit 2; with --skip-bad listed. Repeated envelopes:
    each step once in the CSV, the count printed."""
    root = recorded.parent.parent
    (root / "cbs.yaml").write_text(CALLBACKS["cbs.yaml"])
    lines = (recorded / "events.jsonl").read_bytes().splitlines()
    deep = b'{"bus_id":"x","seq":1,"event":' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    for name, data, where in (
        ("mid.jsonl", b"\n".join([*lines[:3], deep, *lines[3:]]) + b"\n", 4),
        ("last.jsonl", b"\n".join(lines) + b"\n" + b"[" * 10_000, len(lines) + 1),
    ):
        (root / name).write_bytes(data)
        done = cli("replay", name, "--callbacks", "cbs.yaml", "--output-dir", "o", cwd=root)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert f"bad event log: {name}:{where}: a value nested deeper than 128" in done.stderr
        assert "--skip-bad" in done.stderr
        done = cli(
            "replay", name, "--callbacks", "cbs.yaml", "--output-dir", "o", "--skip-bad", cwd=root
        )
        assert done.returncode == 0, done.stderr
        assert f"skipped line {where}: a value nested deeper than 128" in done.stdout
    doubled = [lines[0], *(x for line in lines[1:] for x in (line, line))]
    (root / "dup.jsonl").write_bytes(b"\n".join(doubled) + b"\n")
    done = cli("replay", "dup.jsonl", "--callbacks", "cbs.yaml", "--output-dir", "d", cwd=root)
    assert done.returncode == 0, done.stderr
    assert f"duplicates: {len(lines) - 1} envelope(s) repeated in the log" in done.stdout
    replayed = (root / "d" / "demo" / "metrics.csv").read_text()
    assert replayed == (recorded / "metrics.csv").read_text()


@pytest.mark.slow
def test_cli_a_relative_path_out_of_the_replays_run_dir_is_refused(recorded: Path) -> None:
    """``out_path: ../../x.csv`` or ``log_dir: ../tb`` would write outside the replay's
    own run dir: one line naming the file, the place and the key, exit 2, nothing
    written; an absolute path is the way to write elsewhere."""
    root = recorded.parent.parent
    for n, (kind, key, value) in enumerate(
        [("csv_metrics", "out_path", "../../x.csv"), ("tensorboard_logger", "log_dir", "../tb")]
    ):
        (root / "esc.yaml").write_text(
            "- {kind: csv_metrics, params: {out_path: m.csv}}\n"
            f"- {{kind: {kind}, params: {{{key}: {value}}}}}\n"
        )
        done = cli("replay", "runs/demo", "--callbacks", "esc.yaml", "--output-dir", "o", cwd=root)
        assert done.returncode == 2, done.stderr
        assert done.stderr == (
            f"evsys-async: bad config: esc.yaml:2: callbacks[1].params ({kind}): {kind} {key} "
            f"'{value}' leads out of the run directory; a relative path is inside the run "
            "directory (a replay's or a consumer's own, too): give an absolute path to write "
            "elsewhere\n"
        ), n
        assert not (root / "o").exists() and not (root.parent / "x.csv").exists()
    (root / "abs.yaml").write_text(
        f"- {{kind: csv_metrics, params: {{out_path: {root}/abs.csv}}}}\n"
    )
    done = cli("replay", "runs/demo", "--callbacks", "abs.yaml", "--output-dir", "o", cwd=root)
    assert done.returncode == 0, done.stderr
    assert (root / "abs.csv").read_text() == (recorded / "metrics.csv").read_text()
