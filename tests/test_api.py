"""The public surface: ``__all__`` matches docs/api.md; optional extras stay unimported.

The layers, the import order and the import cycles are ``tests/test_design.py``'s.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import evsys_async

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.mark.slow
def test_import_does_not_pull_optional_extras() -> None:
    code = (
        "import sys, evsys_async; "
        "bad = [m for m in ('tensorboardX', 'wandb', 'mlflow', 'redis', 'httpx') if m in sys.modules]; "
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
