"""The local experiment store: the original system's layout on disk, one JSON file per record.

Layout under ``root`` (by default ``<output_dir>/store``)::

    experiments/<experiment_id>/experiment.json
    experiments/<experiment_id>/runs/<run_key>/run.json
    experiments/<experiment_id>/runs/<run_key>/metrics.jsonl
    experiments/<experiment_id>/runs/<run_key>/evals.jsonl
    experiments/<experiment_id>/runs/<run_key>/predictions.jsonl
    experiments/<experiment_id>/runs/<run_key>/checkpoints.jsonl

Records (``experiment.json``, ``run.json``) are written atomically
(``_util/files.py``'s ``write_atomic``: a temp file beside the target, ``fsync``,
``os.replace``), so a reader sees the old record or the new one. Row files
grow by whole lines, one write per call, all of it or none
(``append_whole``: a write a full disk refuses raises ``OSError`` and leaves
no torn line).
Shared by ``evsys_logger`` and ``Experiment``; ``owned_by_experiment`` says
the experiment itself writes the records (``evsys_logger`` then stays off).
Methods block on file I/O: call them from a ``def`` hook or a worker thread.
Imports only ``errors`` and ``_util`` (``files``, ``jsonl``): it sits below ``state``.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from ._util.files import append_whole, write_atomic
from ._util.jsonl import encode_json
from .errors import ConfigError

__all__ = ["LocalStore", "RowKind"]

RowKind = Literal["metrics", "evals", "predictions", "checkpoints"]
_ROW_KINDS = ("metrics", "evals", "predictions", "checkpoints")

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _safe_id(value: str, what: str) -> str:
    safe = _SAFE.sub("_", value).strip("._")
    if not safe:
        raise ConfigError(f"store: {what} {value!r} has no usable characters for a directory name")
    return safe


class LocalStore:
    """A directory of experiments and runs (see the module docstring).

    Thread-safe: a lock orders record updates (read-modify-write of a JSON
    record) across threads of one process.
    """

    def __init__(self, root: str | os.PathLike[str], *, owned_by_experiment: bool = False) -> None:
        self.root = Path(root)
        self.owned_by_experiment = owned_by_experiment
        self._lock = threading.Lock()

    # -- paths -----------------------------------------------------------------

    def experiment_dir(self, experiment_id: str) -> Path:
        return self.root / "experiments" / _safe_id(experiment_id, "experiment id")

    def run_dir(self, experiment_id: str, run_key: str) -> Path:
        return self.experiment_dir(experiment_id) / "runs" / _safe_id(run_key or "run", "run key")

    # -- records ---------------------------------------------------------------

    def create_experiment(
        self, name: str, *, experiment_id: str | None = None, **fields: Any
    ) -> str:
        """Create (or reopen) an experiment record; returns its id."""
        eid = experiment_id or f"{_safe_id(name, 'experiment name')}-{uuid.uuid4().hex[:8]}"
        path = self.experiment_dir(eid) / "experiment.json"
        with self._lock:
            record = self._read(path) or {
                "id": eid,
                "name": name,
                "created_at": time.time(),
                "status": "running",
            }
            record.update(fields)
            record["updated_at"] = time.time()
            self._write_atomic(path, record)
        return eid

    def update_experiment(self, experiment_id: str, **fields: Any) -> dict[str, Any]:
        return self._update(self.experiment_dir(experiment_id) / "experiment.json", fields)

    def start_run(self, experiment_id: str, run_key: str, **fields: Any) -> dict[str, Any]:
        """Create or update ``run.json`` with ``status="running"`` and ``fields``."""
        defaults = {
            "run_key": run_key,
            "experiment_id": experiment_id,
            "created_at": time.time(),
            "status": "running",
        }
        path = self.run_dir(experiment_id, run_key) / "run.json"
        with self._lock:
            record = {**defaults, **(self._read(path) or {}), "status": "running", **fields}
            record["updated_at"] = time.time()
            self._write_atomic(path, record)
        return record

    def update_run(self, experiment_id: str, run_key: str, **fields: Any) -> dict[str, Any]:
        return self._update(self.run_dir(experiment_id, run_key) / "run.json", fields)

    def read_experiment(self, experiment_id: str) -> dict[str, Any] | None:
        return self._read(self.experiment_dir(experiment_id) / "experiment.json")

    def read_run(self, experiment_id: str, run_key: str) -> dict[str, Any] | None:
        return self._read(self.run_dir(experiment_id, run_key) / "run.json")

    # -- rows ------------------------------------------------------------------

    def append(
        self, experiment_id: str, run_key: str, kind: RowKind, rows: Iterable[Mapping[str, Any]]
    ) -> int:
        """Append ``rows`` to the run's ``<kind>.jsonl`` in one write, whole or not at
        all (a refused write raises ``OSError`` and leaves no torn line); returns how
        many."""
        self.rows_path(experiment_id, run_key, kind)  # checks the kind
        lines = [encode_json(row) for row in rows]  # NaN and +-inf kept as strings
        if not lines:
            return 0
        path = self.rows_path(experiment_id, run_key, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        append_whole(path, b"\n".join(lines) + b"\n")
        return len(lines)

    def rows_path(self, experiment_id: str, run_key: str, kind: RowKind) -> Path:
        """The file that holds the run's ``kind`` rows (``<run dir>/<kind>.jsonl``)."""
        if kind not in _ROW_KINDS:
            raise ValueError(f"store: kind must be one of {', '.join(_ROW_KINDS)}, got {kind!r}")
        return self.run_dir(experiment_id, run_key) / f"{kind}.jsonl"

    def read_rows(self, experiment_id: str, run_key: str, kind: RowKind) -> list[dict[str, Any]]:
        path = self.run_dir(experiment_id, run_key) / f"{kind}.jsonl"
        if not path.exists():
            return []
        with open(path, "rb") as f:
            return [msgspec.json.decode(line) for line in f if line.strip()]

    # -- internals -------------------------------------------------------------

    def _update(self, path: Path, fields: Mapping[str, Any]) -> dict[str, Any]:
        with self._lock:
            record = self._read(path)
            if record is None:
                raise FileNotFoundError(f"store: no record at {path}; create it first")
            record.update(fields)
            record["updated_at"] = time.time()
            self._write_atomic(path, record)
        return record

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        record: dict[str, Any] = msgspec.json.decode(data)
        return record

    @staticmethod
    def _write_atomic(path: Path, record: Mapping[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, msgspec.json.format(encode_json(record), indent=2), errors="raise")
