"""The public surface: __all__ matches docs/api.md; imports point one way (errors -> ... -> cli)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import evsys_async

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "evsys_async"

# The import order, lowest first: a module imports only modules at or below it. Every
# module of the package is listed (a new one fails test_every_module_has_a_place_in_the_order
# until it is put here); a planned one may be listed before it exists.
ORDER = [
    # the ground: errors, version, the utilities (async helpers, worker, files, logging, ...)
    "errors", "_version", "_util",
    # events and what a subscriber's buffer keeps
    "events", "policies",
    # the bus (and the public path of its subscription module)
    "bus", "subscription",
    # beyond the bus (the coordinator protocol sits below the transports that implement it)
    "coordinator", "transports", "store", "state", "callbacks", "evaluators",
    # the run and its phases
    "loop",
    # on top of runs
    "experiment", "config", "demo", "replay", "consume", "cli", "__main__",
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
    assert top in ORDER, (
        f"evsys_async.{top} is missing from ORDER in tests/test_api.py: add it after the "
        "modules it imports and before the ones that import it"
    )
    return ORDER.index(top)


def _modules() -> list[str]:
    """The top-level modules and subpackages of the package."""
    names = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"}
    names |= {p.parent.name for p in PKG.glob("*/__init__.py")}
    return sorted(names)


def test_every_module_has_a_place_in_the_order() -> None:
    missing = [m for m in _modules() if m not in ORDER]
    assert not missing, (
        f"modules missing from ORDER in tests/test_api.py: {missing}; add each after the "
        "modules it imports and before the ones that import it"
    )


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
                module = node.module.split(".") if node.module else []
                # `from . import x` at the top level imports the module x
                names = [[*base, *module]] if base or module else [[a.name] for a in node.names]
                for target_parts in names:
                    target = ".".join(target_parts)
                    top = target_parts[0]
                    assert _rank(top) <= _rank(own), (
                        f"{rel} imports {target}: against the import order"
                    )
                    if own == "callbacks" and parts[1] not in ("_adapter", "_remote"):
                        assert top not in ("bus", "loop"), f"{rel} imports {target}"


#: packages whose modules must sit in no import cycle (the whole package, once the
#: loop's phases take narrow interfaces)
ACYCLIC = ("bus", "callbacks")


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, every import counted: at the top,
    inside functions, under ``TYPE_CHECKING``."""

    def name(path: Path) -> str:
        parts = list(path.relative_to(PKG).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    mods = {name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("evsys_async."):
                        graph[mod].add(alias.name.removeprefix("evsys_async."))
                continue
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "evsys_async":
                target = node.module.removeprefix("evsys_async").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                graph[mod].add(sub if sub in mods else target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_acyclic_packages() -> None:
    """No module of ``ACYCLIC`` is in an import cycle, imports inside functions and
    annotation-only imports included (a cycle held apart by a late import is one)."""
    cycles = [c for c in _cycles(_import_graph()) if any(m.split(".")[0] in ACYCLIC for m in c)]
    assert not cycles, (
        "these modules import each other; move what both need below them, or inject it: "
        + "; ".join(" <-> ".join(c) for c in cycles)
    )


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_transports_is_an_attribute_without_importing_redis() -> None:
    code = (
        "import sys, evsys_async as ev\n"
        "assert ev.transports.JsonlSink and ev.transports.RedisStreamSink\n"
        "assert 'redis' not in sys.modules, 'import evsys_async imported redis'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_callback_hook_is_documented() -> None:
    """Each hook of ``Callback`` says when it fires, what it gets and where it runs."""
    from evsys_async.callbacks._hooks import EXPERIMENT_HOOKS, LOOP_HOOKS, OTHER_HOOKS

    hooks = [*(h for h, _ in LOOP_HOOKS.values()), *OTHER_HOOKS, "flush", *EXPERIMENT_HOOKS]
    undocumented = [h for h in hooks if not (getattr(evsys_async.Callback, h).__doc__ or "")]
    assert not undocumented, f"Callback hooks without a docstring: {undocumented}"


def test_the_experiment_records_have_one_class_and_two_paths() -> None:
    """Defined below the callbacks (``state``), imported from ``experiment`` as before."""
    import evsys_async.experiment as experiment
    import evsys_async.state as state

    for name in ("Arm", "ArmResult", "ExperimentResult", "RunResult"):
        assert getattr(experiment, name) is getattr(state, name) is getattr(evsys_async, name)
