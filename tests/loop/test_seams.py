"""The loop's seams: phases see their run through a Protocol and the frozen settings.

``_run.Run`` holds what a run's phases share; only the facade (``_loop.py``)
makes one, and no phase imports ``_run`` or ``_loop`` — not even for an
annotation — so ``loop/`` has no import cycle (docs/design.md, "A run").
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import evsys_async.loop as loop_pkg
from evsys_async.loop._settings import RunSettings

LOOP = Path(loop_pkg.__file__).parent


def _loop_imports(path: Path) -> set[str]:
    """The ``loop/`` modules ``path`` imports, at any depth (``TYPE_CHECKING`` included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found |= {a.name for a in node.names}
    return found


def test_only_the_facade_makes_a_run_and_only_the_package_imports_the_facade() -> None:
    assert "_run" in _loop_imports(LOOP / "_loop.py")  # the check sees imports at all
    bad = []
    for path in sorted(LOOP.glob("*.py")):
        imports = _loop_imports(path)
        if "_run" in imports and path.stem != "_loop":
            bad.append(f"{path.name} imports _run")
        if "_loop" in imports and path.stem != "__init__":
            bad.append(f"{path.name} imports _loop")
    assert not bad, (
        "a phase takes RunSettings and a Protocol of what it uses of the run, never the "
        "Run or the TrainingLoop:\n  " + "\n  ".join(bad)
    )


def test_the_package_init_only_re_exports() -> None:
    tree = ast.parse((LOOP / "__init__.py").read_text())
    kinds = {type(node).__name__ for node in tree.body}
    assert kinds <= {"Expr", "ImportFrom", "Assign"}, kinds
    assert loop_pkg.__all__ == sorted(loop_pkg.__all__)
    assert {"CheckpointFn", "StepFn", "TrainingLoop"} <= set(loop_pkg.__all__)


def test_run_settings_are_frozen() -> None:
    names = {f.name for f in dataclasses.fields(RunSettings)}
    assert {"step", "run_key", "start_step", "coordinator", "drain_timeout"} <= names
    settings = RunSettings(
        step=lambda state, i: None,
        run_key="r",
        start_step=0,
        evaluators=(),
        save_every=0,
        checkpoint=None,
        eval_mode="inline",
        eval_timeout=1.0,
        max_evals_in_flight=1,
        snapshot=None,
        control_timeout=1.0,
        drain_timeout=1.0,
        callback_errors="log",
        checkpoint_on_error=True,
        coordinator=None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.save_every = 5  # type: ignore[misc]
