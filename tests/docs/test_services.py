"""docs/services.md: its code is the examples' code, and each pattern names its tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "services.md").read_text()


def test_code_blocks_are_excerpts_of_the_examples() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC, re.S)
    assert len(blocks) >= 4
    for block in blocks:
        first, *lines = block.splitlines()
        source = re.fullmatch(r"# (examples/\w+\.py)", first)
        assert source is not None, f"a python block starts with '# examples/<file>.py': {first!r}"
        example = (ROOT / source.group(1)).read_text().splitlines()
        for line in lines:  # each line as written, in the same order
            assert line in example, f"{source.group(1)} lacks: {line!r}"
            example = example[example.index(line) + 1 :]


def test_each_pattern_names_an_example_and_tests_that_exist() -> None:
    named = set(re.findall(r"`((?:examples|tests)/[\w/]+\.py)`", DOC))
    assert {"examples/eval_server.py", "examples/service.py", "examples/many_runs.py"} <= named
    assert sum(n.startswith("tests/") for n in named) >= 4
    for name in named:
        assert (ROOT / name).exists(), name


def test_the_readme_links_the_services_page() -> None:
    assert "(docs/services.md)" in (ROOT / "README.md").read_text()


def test_the_services_defaults_are_the_ones_the_page_gives() -> None:
    import inspect

    from tests.servers import load_example

    defaults = {
        name: p.default
        for name, p in inspect.signature(load_example("service").Service).parameters.items()
    }
    assert defaults["stop_grace"] == 10.0 and "`stop_grace` (10 s)" in DOC
    assert defaults["cancel_grace"] == 5.0 and "`cancel_grace` seconds (5)" in DOC
    assert defaults["max_body"] == 64 * 1024 and "`max_body` (64 kB)" in DOC
    assert defaults["flush_every"] == 0.1 and "`flush_every` (100 ms)" in DOC
    assert defaults["send_buffer"] == 16 * 1024 and "`SO_SNDBUF`, 16 kB" in DOC
