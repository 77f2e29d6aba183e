"""docs/distributed.md and its neighbours: the configs they show load, the tests they name exist."""

from __future__ import annotations

import re
from pathlib import Path

import evsys_async as ev
from evsys_async.config import load_callbacks

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "distributed.md").read_text()


def test_the_run_config_shown_loads(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    run = next(b for b in blocks if "transports:" in b)
    path = tmp_path / "run.yaml"
    path.write_text(run)
    config = ev.load_config(path)
    assert isinstance(config, ev.RunConfig)
    assert config.transports[0].kind == "redis"


def test_the_callbacks_file_shown_loads(tmp_path: Path) -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC, re.S)
    callbacks = next(b for b in blocks if b.startswith("- {kind:"))
    path = tmp_path / "cbs.yaml"
    path.write_text(callbacks)
    assert [c.name for c in load_callbacks(path)] == ["csv_metrics", "tensorboard_logger"]


def test_the_config_page_transports_block_loads(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "config.md").read_text()
    block = re.search(r"```yaml\n(transports:.*?)```", text, re.S)
    assert block is not None
    path = tmp_path / "run.yaml"
    path.write_text("num_steps: 3\n" + block.group(1))
    assert ev.load_config(path).transports[0].params["maxlen"] == 1000000  # type: ignore[union-attr]


def test_the_tests_named_exist_and_the_readme_links_the_page() -> None:
    for name in re.findall(r"`(tests/[\w/]+\.py)`", DOC):
        assert (ROOT / name).exists(), name
    assert "(docs/distributed.md)" in (ROOT / "README.md").read_text()
