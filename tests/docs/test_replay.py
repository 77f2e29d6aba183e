"""docs/replay.md: its shell session prints what the page shows; its Python prints
what it should. The blocks run through the docs runner (``tests/docs/blocks.py``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.blocks import ROOT, blocks, run_block

PAGE = ROOT / "docs" / "replay.md"


@pytest.mark.slow
def test_the_docs_examples_print_what_the_page_shows(tmp_path: Path) -> None:
    shell, python = (b for b in blocks(PAGE) if b.fragment is None)
    assert (shell.lang, python.lang) == ("bash", "python")
    shown = re.search(r"```text\n(.*?)```", PAGE.read_text(), re.S)
    assert shown
    done = run_block(shell, tmp_path)
    assert done.returncode == 0, done.stderr
    timing = re.compile(r" in \d+\.\d+ s$")
    printed = done.stdout.split("\n\nreplayed ", 1)[1]
    assert [timing.sub("", x) for x in ("replayed " + printed).splitlines()] == [
        timing.sub("", x) for x in shown.group(1).splitlines()
    ]
    done = run_block(python, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["replayed/demo 212 True", "200 steps"]
