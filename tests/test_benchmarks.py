"""The benchmark scripts' verdicts reach the shell: a printed FAIL is exit 1.

Nothing here measures speed: one quick benchmark runs with a target no machine
meets (``--target``, events per second) and one every machine meets, and only
the exit code and the verdict words are checked.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def quick_replay(target: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_replay.py"), "--quick", "--target", target],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.slow
def test_a_missed_target_prints_fail_and_exits_1() -> None:
    missed = quick_replay("1e15")
    assert missed.returncode == 1, missed.stderr
    assert missed.stdout.count("FAIL") == 4 and "PASS" not in missed.stdout
    assert "4 target(s) missed: asyncio replay -> no-op def;" in missed.stderr
    met = quick_replay("1")
    assert met.returncode == 0, met.stderr
    assert met.stdout.count("PASS") == 4 and "FAIL" not in met.stdout


def test_every_benchmark_runs_its_main_through_run_main_and_prints_no_verdict_by_hand() -> None:
    """One helper decides every script's exit: ``run_main`` under ``__main__``, and
    the verdict words only through ``verdict``."""
    for path in sorted(BENCHMARKS.glob("bench_*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        guard = [
            node
            for node in tree.body
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)
        ]
        assert guard and "run_main(" in ast.unparse(guard[0]), path.name
        for line in source.splitlines():
            for word in ("'PASS'", '"PASS"', "'FAIL'", '"FAIL"', '"MISSED"'):
                assert word not in line or "verdict(" in line, f"{path.name}: {line.strip()}"
