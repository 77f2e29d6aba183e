"""Code blocks of the Markdown pages, and running them as a reader would.

:func:`blocks` finds every fenced ``python``, ``bash``, ``sh``, ``shell`` and
``console`` block of a page, with its line and its marker: an HTML comment on
the line before the fence, ``<!-- fragment -->`` (or ``<!-- fragment: why -->``),
says the block is not meant to run as it stands (a fragment of a larger
program, or one that needs a service such as Redis or a GPU). docs/design.md
("Tests") states the rule for writers of the docs.

:func:`run_page` runs a page's runnable blocks in order in one temporary
directory, as a reader following the page would: Python with this venv's
interpreter, shell with ``bash -e -o pipefail`` (``evsys-async`` on ``PATH``); a
``console`` block runs its ``$ `` lines. It returns the first failure, naming
the page and the block's line.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: the languages a block may be run as
RUNNABLE = {
    "python": "python",
    "bash": "shell",
    "sh": "shell",
    "shell": "shell",
    "console": "console",
}
#: the one marker: ``<!-- fragment -->`` or ``<!-- fragment: why -->``
MARKER = re.compile(r"^<!--\s*fragment(?::\s*(?P<why>.*?))?\s*-->\s*$")
_FENCE = re.compile(r"^(?P<fence>```+|~~~+)(?P<lang>[\w+-]*)[^\n]*$")


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # the fence's line, 1-based
    lang: str
    code: str
    fragment: str | None  # the marker's reason ("" without one), None: runnable

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path, *, root: Path = ROOT) -> list[Block]:
    """Every fenced block of ``page`` in a language of :data:`RUNNABLE`, in order
    (``page`` named relative to ``root``)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    name = str(page.relative_to(root))
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group("fence"), m.group("lang")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence)), len(lines))
        if lang in RUNNABLE:
            prev = lines[i - 1].strip() if i else ""
            marker = MARKER.match(prev)
            why = (marker.group("why") or "") if marker else None
            code = "\n".join(lines[i + 1 : end]) + "\n"
            out.append(Block(name, i + 1, lang, code, why))
        i = end + 1
    return out


def markers_without_a_block(page: Path) -> list[int]:
    """Lines of ``page`` holding a marker that no fenced block follows."""
    lines = page.read_text(encoding="utf-8").splitlines()
    return [
        n + 1
        for n, line in enumerate(lines)
        if MARKER.match(line.strip()) and not (n + 1 < len(lines) and _FENCE.match(lines[n + 1]))
    ]


def environment() -> dict[str, str]:
    """The reader's environment: this venv's ``python`` and ``evsys-async`` first on
    ``PATH``, nothing of the test run's ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COLUMNS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def command(block: Block, workdir: Path) -> list[str]:
    kind = RUNNABLE[block.lang]
    if kind == "python":
        script = workdir / f"block_{block.line}.py"
        script.write_text(block.code, encoding="utf-8")
        return [sys.executable, script.name]
    code = block.code
    if kind == "console":
        code = "\n".join(x[2:] for x in code.splitlines() if x.startswith("$ ")) + "\n"
    return ["bash", "-e", "-o", "pipefail", "-c", code]


def run_block(
    block: Block, workdir: Path, *, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run one block in ``workdir`` as :func:`run_page` does; what it printed."""
    return subprocess.run(
        command(block, workdir),
        cwd=workdir,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=timeout,
    )


def run_page(page: Path, workdir: Path, *, timeout: float = 120) -> list[tuple[Block, str]]:
    """Run ``page``'s runnable blocks in order in ``workdir`` (which gets a copy of the
    repository's ``examples/``, as a reader at the repository root has them); the
    ones that failed, each with what it printed (the blocks after a failure still
    run)."""
    shutil.copytree(ROOT / "examples", workdir / "examples", dirs_exist_ok=True)
    failed: list[tuple[Block, str]] = []
    for block in blocks(page):
        if block.fragment is not None:
            continue
        try:
            done = run_block(block, workdir, timeout=timeout)
        except subprocess.TimeoutExpired:
            failed.append((block, f"did not finish within {timeout} s"))
            continue
        if done.returncode != 0:
            shown = f"{done.stdout[-2000:]}{done.stderr[-3000:]}"
            failed.append((block, f"exit {done.returncode}\n{shown}"))
    return failed
