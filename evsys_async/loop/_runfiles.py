"""The files a run writes itself: ``hparams.yaml`` at its start, ``manifest.json``
and ``error.txt`` at its end (docs/design.md, "A run" and "The shutdown").

* **Hyperparameters** (:func:`hparams_of`): what the step reads as
  ``state.ctx.run_config`` (``TrainingLoop(config=...)``; a config file's
  ``params`` and ``seed``; an arm's params with ``arm``, ``repeat`` and
  ``seed``), beside the specs a config file built the run from (``step``,
  ``checkpoint``, ``evaluators``, ``callbacks``, as ``ctx.config`` records
  them; a hyperparameter of the same name wins), as plain data with every
  credential masked (``_util/secrets.redact_config``). The run carries them in
  ``TrainStarted.config`` (so replay, consumers and every logger see them) and
  rank 0 writes them to ``hparams.yaml`` in the run dir, atomically, before
  its first event.
* **The record** (:func:`manifest_of`, :func:`write_record`): ``manifest.json``
  (every rank, in its own run dir) and, for a failed step, ``error.txt`` with
  its traceback. Both are replaced atomically; one that cannot be written is a
  WARNING and ``artifacts.manifest_error``, never an exception out of the
  shutdown.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import yaml

from .._util.files import write_atomic
from .._util.log import get_logger
from .._util.secrets import redact_config
from ..errors import describe
from ..state import LogContext, LoopArtifacts, LoopState

__all__ = ["HPARAMS_FILE", "hparams_of", "manifest_of", "write_hparams", "write_record"]

_log = get_logger()

HPARAMS_FILE = "hparams.yaml"
#: what a config file built the run from, recorded beside the hyperparameters
_SPEC_KEYS = ("step", "checkpoint", "evaluators", "callbacks")


def hparams_of(ctx: LogContext) -> dict[str, Any]:
    """The run's hyperparameters as recorded (see the module docstring). Never raises."""
    recorded: Any = ctx.config or {}
    if isinstance(recorded.get("run"), Mapping):  # an experiment's config: its run
        recorded = recorded["run"]
    specs = {k: recorded[k] for k in _SPEC_KEYS if recorded.get(k) not in (None, "", [], {})}
    plain = redact_config({**specs, **(ctx.run_config or {})})
    return plain if isinstance(plain, dict) else {}


def write_hparams(run_dir: Path, hparams: dict[str, Any]) -> None:
    """``hparams.yaml`` in ``run_dir``, whole or not at all; a failure is a WARNING."""
    text = yaml.safe_dump(hparams, sort_keys=False, allow_unicode=True, default_flow_style=False)
    write_atomic(run_dir / HPARAMS_FILE, text)


def manifest_of(artifacts: LoopArtifacts, state: LoopState, run_key: str) -> dict[str, Any]:
    """``manifest.json``'s content: how the run ended, its rank, its callbacks' health."""
    report = artifacts.callback_report
    return {
        "run_key": run_key,
        "rank": state.rank,
        "world_size": state.world_size,
        "status": artifacts.status,
        "start_step": artifacts.start_step,
        "steps_completed": artifacts.steps_completed,
        "total_requested_steps": artifacts.total_requested_steps,
        "stop_reason": artifacts.stop_reason,
        "error": artifacts.error,
        "train_seconds": artifacts.train_seconds,
        "drain_seconds": artifacts.drain_seconds,
        "checkpoints": artifacts.checkpoints,
        "evals": msgspec.to_builtins(artifacts.evals),
        "degraded": [
            {"callback": name, **msgspec.to_builtins(health.degraded)}
            for name, health in report.items()
            if health.degraded is not None
        ],
        "callback_report": msgspec.to_builtins(report),
    }


def write_record(artifacts: LoopArtifacts, state: LoopState, run_key: str) -> None:
    """``manifest.json`` and, after a failed step, ``error.txt``, each replaced
    atomically in the rank's run dir. A file that cannot be written is a WARNING and
    ``artifacts.manifest_error`` (the first such error); never raises for it."""
    path = artifacts.manifest_path
    if path is None:
        return
    files = [(path, json.dumps(manifest_of(artifacts, state, run_key), indent=2, default=str))]
    if artifacts.traceback:  # the failed step's traceback stays with the run
        files.append((path.parent / "error.txt", artifacts.traceback))
    for target, text in files:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # a rank's dir, emptied by rank 0
            write_atomic(target, text, errors="raise")
        except OSError as exc:
            artifacts.manifest_error = artifacts.manifest_error or f"{target}: {describe(exc)}"
            _log.warning("the run's record could not be written", path=str(target), error=repr(exc))
