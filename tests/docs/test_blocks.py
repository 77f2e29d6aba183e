"""Every Python and shell block of README.md and docs/*.md runs as written.

Each page's runnable blocks run in order in one temporary directory, as a
reader following the page would (``tests/docs/blocks.py``: the venv's Python,
bash with ``evsys-async`` on ``PATH``). A block that is not meant to run as it
stands carries ``<!-- fragment -->`` (or ``<!-- fragment: why -->``) on the line
before its fence; docs/design.md ("Tests") has the rule. So drift between the
docs and the code fails here, naming the page and the block's line.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.blocks import RUNNABLE, blocks, markers_without_a_block, pages, run_page

#: pages whose blocks this runner leaves alone, and why (none: a page's excerpts of
#: the examples are marked fragments, and tests/docs/test_services.py holds them to
#: the examples' code)
EXCLUDED: dict[str, str] = {}

PAGES = [p for p in pages() if p.name not in EXCLUDED]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_page_runs(page: Path, tmp_path: Path) -> None:
    failed = run_page(page, tmp_path)
    assert not failed, "\n\n".join(f"{b.where} ({b.lang}): {out}" for b, out in failed)


def test_every_marker_sits_on_a_block_and_the_runner_sees_every_page() -> None:
    """A marker that no fence follows marks nothing (a typo, or a block moved away);
    the pages are found, and the ones left out are the listed ones."""
    names = {p.name for p in pages()}
    assert {"README.md", "guide.md", "callbacks.md", "replay.md"} <= names
    assert set(EXCLUDED) <= names
    for page in pages():
        assert markers_without_a_block(page) == [], page.name
    runnable = [b for p in PAGES for b in blocks(p) if b.fragment is None]
    assert len(runnable) >= 20 and {b.lang for b in runnable} <= set(RUNNABLE)


def test_a_fragment_is_told_by_the_line_before_its_fence(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# t\n\n```python\nprint(1)\n```\n\n<!-- fragment: needs Redis -->\n```bash\nx\n```\n"
        "<!-- fragment -->\n```python\ny\n```\n\n```yaml\nz: 1\n```\n"
    )
    found = blocks(page, root=tmp_path)
    assert [(b.line, b.lang, b.fragment) for b in found] == [
        (3, "python", None),
        (8, "bash", "needs Redis"),
        (12, "python", ""),
    ]
