"""docs/replay.md: its shell session prints what the page shows; its Python runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_docs_examples_run(tmp_path: Path) -> None:
    """docs/replay.md: the shell session prints what the page shows; the Python runs."""
    import re

    text = (Path(__file__).parents[2] / "docs" / "replay.md").read_text()
    shell = re.search(r"```bash\n(.*?)```", text, re.S)
    shown = re.search(r"```text\n(.*?)```", text, re.S)
    python = re.search(r"```python\n(.*?)```", text, re.S)
    assert shell and shown and python
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COLUMNS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["bash", "-ec", shell.group(1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    timing = re.compile(r" in \d+\.\d+ s$")
    printed = done.stdout.split("\n\nreplayed ", 1)[1]
    assert [timing.sub("", x) for x in ("replayed " + printed).splitlines()] == [
        timing.sub("", x) for x in shown.group(1).splitlines()
    ]
    (tmp_path / "example.py").write_text(python.group(1))
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["replayed/demo 212 True", "200 steps"]
