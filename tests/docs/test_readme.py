"""The README's examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import evsys_async as ev

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_readme_python_example_is_examples_readme() -> None:
    """The block itself runs in tests/docs/test_blocks.py; examples/readme.py is the
    same script."""
    block = re.search(r"```python\n(.*?)```", README, re.S)
    assert block is not None
    example = (ROOT / "examples" / "readme.py").read_text()
    for line in block.group(1).splitlines():
        if line.strip() and not line.strip().startswith(
            ("loop = ", "step, num_steps", "evaluators=")
        ):
            assert line.strip() in example, line


def test_readme_yaml_is_the_demo_and_validates(tmp_path: Path) -> None:
    block = re.search(r"```yaml\n(.*?)```", README, re.S)
    assert block is not None
    assert block.group(1) == (ROOT / "examples" / "demo.yaml").read_text()
    assert "evsys-async run examples/demo.yaml" in README  # the path from the repo root
    config = ev.load_config(ROOT / "examples" / "demo.yaml")
    assert isinstance(config, ev.RunConfig)
    assert config.num_steps == 200
    assert [c.kind for c in config.callbacks] == [
        "print_progress",
        "csv_metrics",
        "local_logger",
        "early_stopping",
    ]
