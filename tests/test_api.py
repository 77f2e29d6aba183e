"""The public surface: __all__ matches docs/api.md; imports point one way (errors -> ... -> cli)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import evsys_async

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "evsys_async"

# the import order: errors -> events -> policies -> bus -> transports -> store -> state
# -> callbacks -> evaluators -> _signals -> loop -> experiment -> config -> demo -> replay
# -> consume -> cli
ORDER = [
    "errors", "_version", "_json", "_secrets", "_log", "_worker", "events", "policies", "subscription", "bus", "coordinator", "transports", "store", "_files",
    "state", "callbacks", "evaluators", "_signals", "loop", "experiment", "config", "demo",
    "replay", "consume", "testing", "cli", "__main__",
]  # fmt: skip


def _documented(heading: str | None) -> list[str]:
    """The names in the table of docs/api.md under ``## heading`` (None: the top one)."""
    text = (ROOT / "docs" / "api.md").read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    if heading is None:
        body = sections[0]
    else:
        (body,) = [s for s in sections[1:] if s.startswith(heading)]
    return re.findall(r"^\| `(\w+)` \|", body, re.M)


def test_all_is_sorted_and_matches_the_api_reference() -> None:
    assert evsys_async.__all__ == sorted(evsys_async.__all__)
    assert sorted(_documented(None)) == sorted(evsys_async.__all__)
    for name in evsys_async.__all__:
        assert hasattr(evsys_async, name), name


def test_evaluators_all_matches_the_api_reference() -> None:
    import evsys_async.evaluators as evaluators

    assert evaluators.__all__ == sorted(evaluators.__all__)
    assert sorted(_documented("Evaluators")) == sorted(evaluators.__all__)
    for name in evaluators.__all__:
        assert hasattr(evaluators, name), name


def _rank(module: str) -> int:
    top = module.split(".")[0]
    return ORDER.index(top)


def test_imports_point_one_way() -> None:
    """A module imports only modules ranked at or below it (built-ins: no bus, no loop)."""
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = rel.parts
        if parts[-1] == "__init__":
            continue
        own = parts[0]
        tree = ast.parse(path.read_text())
        typing_only = {  # `if TYPE_CHECKING:` imports exist for annotations only
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
            for n in ast.walk(block)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                base = list(parts[: len(parts) - node.level])
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                if not target:
                    continue
                top = target.split(".")[0]
                if top not in ORDER or own not in ORDER:
                    continue
                assert _rank(top) <= _rank(own), f"{rel} imports {target}: against the import order"
                if own == "callbacks" and parts[1] not in ("base", "registry", "_builtins"):
                    assert top not in ("bus", "loop"), f"built-in {rel} imports {target}"


def test_import_does_not_pull_optional_extras() -> None:
    code = (
        "import sys, evsys_async; "
        "bad = [m for m in ('tensorboardX', 'wandb', 'redis', 'httpx') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


#: the original system's callbacks module exported these names
ORIGINAL_CALLBACKS_ALL = [
    "Callback",
    "CsvMetricsCallback",
    "EarlyStoppingCallback",
    "DebugLoggerCallback",
    "EvsysLoggerCallback",
    "LocalLoggerCallback",
    "LogContext",
    "LoopState",
    "PrintProgressCallback",
    "TensorBoardLoggerCallback",
    "WandbLoggerCallback",
    "build_callbacks",
    "dispatch",
]


def test_every_original_callbacks_name_imports_from_both_roots() -> None:
    """As a user's script does it: a fresh interpreter, plain ``from ... import``."""
    names = ", ".join(ORIGINAL_CALLBACKS_ALL)
    code = (
        f"from evsys_async.callbacks import {names}\n"
        f"from evsys_async import {names}\n"
        "import evsys_async.callbacks as cbs, evsys_async as ev\n"
        f"assert all(getattr(cbs, n) is getattr(ev, n) for n in {ORIGINAL_CALLBACKS_ALL!r})\n"
        f"assert set({ORIGINAL_CALLBACKS_ALL!r}) <= set(cbs.__all__)\n"
        "assert cbs.__all__ == sorted(cbs.__all__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_transports_is_an_attribute_without_importing_redis() -> None:
    code = (
        "import sys, evsys_async as ev\n"
        "assert ev.transports.JsonlSink and ev.transports.RedisStreamSink\n"
        "assert 'redis' not in sys.modules, 'import evsys_async imported redis'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
