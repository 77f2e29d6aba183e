"""``evsys_logger``: the experiment's records into the store ``ctx.store`` names.

By default that is a :class:`~evsys_async.store.LocalStore` under
``<output_dir>/store`` (or ``store_dir``), in the original system's layout: the
experiment record, then per run ``run.json`` (status, config, result) and the
``metrics``, ``evals``, ``predictions`` and ``checkpoints`` rows. The store is
put on ``ctx.store`` when none was there, and the ids on ``ctx.ids``
(``experiment_id``, ``run_id`` = ``<experiment_id>/<run_key>``) for the
callbacks after it.

As in the original system, it disables itself with one WARNING when the experiment
already owns the store (``ctx.store.owned_by_experiment``): the records are
written once. Rows are buffered and appended once per delivered batch
(``flush()``), in the callback's own thread, through a ``RowWriter`` per row
file of a ``LocalStore`` (``_writer.py``: whole rows, refused rows held and
retried, ``degraded`` past the bound); record updates are atomic JSON
rewrites, and one the disk refuses at the end makes the callback degraded.
``store_dir`` expands ``~`` and ``$VAR``; a relative one is under
``output_dir``. Rank 0 only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from .._util.jsonl import encode_json
from .._util.log import get_logger
from .._util.paths import expand_path
from ..errors import describe
from ..state import Degraded, LoopArtifacts, LoopState
from ..store import LocalStore, RowKind
from ._values import benchmark_metrics, benchmark_name, json_ready
from ._writer import RowWriter, degraded_of
from .base import Callback
from .registry import register_callback

__all__ = ["EvsysLoggerCallback"]

_log = get_logger()


@register_callback("evsys_logger")
class EvsysLoggerCallback(Callback):
    """Write experiment, run, metric, eval, prediction and checkpoint records to a store."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        store_dir: str | None = None
        experiment: str | None = None

    def __init__(
        self, store_dir: str | os.PathLike[str] | None = None, experiment: str | None = None
    ) -> None:
        self.store_dir = (
            expand_path(store_dir, what="evsys_logger store_dir") if store_dir is not None else None
        )
        self.experiment = experiment
        self.store: Any = None
        self.experiment_id: str | None = None
        self.disabled = False
        #: why the callback is off (the callback report shows it), else ``None``
        self.disabled_reason: str | None = None
        self._run_key: str | None = None
        self._rows: dict[RowKind, list[dict[str, Any]]] = {}
        self._writers: dict[RowKind, RowWriter] = {}
        self._trouble: Degraded | None = None

    # -- the store ----------------------------------------------------------------

    def _resolve(self, ctx: Any) -> Any:
        if self.disabled:
            return None
        if getattr(ctx.store, "owned_by_experiment", False):
            self.disabled = True
            self.disabled_reason = "the experiment owns the store (records are written once)"
            _log.warning(
                "the experiment owns the store; evsys_logger is off (records are written once)",
                callback=type(self).__name__,
            )
            return None
        if self.store is None:
            if ctx.store is not None and callable(getattr(ctx.store, "append", None)):
                self.store = ctx.store
            else:
                root = self.store_dir or Path(ctx.output_dir) / "store"
                if not root.is_absolute() and self.store_dir is not None:
                    root = Path(ctx.output_dir) / root  # relative: under the output dir
                self.store = LocalStore(root)
                if ctx.store is None:
                    ctx.store = self.store
        if self.experiment_id is None:
            eid = ctx.ids.get("experiment_id")
            name = self.experiment or str((ctx.config or {}).get("experiment") or "default")
            self.experiment_id = self.store.create_experiment(
                name, experiment_id=eid, config=json_ready(ctx.config)
            )
            ctx.ids["experiment_id"] = self.experiment_id
        return self.store

    # -- experiment scope (through dispatch) ----------------------------------------

    def on_experiment_start(self, ctx: Any) -> None:
        self._resolve(ctx)

    def on_group_start(self, ctx: Any, group_name: str) -> None:
        if self._resolve(ctx) is not None:
            ctx.ids[f"group:{group_name}"] = group_name

    def on_benchmark_eval(
        self, ctx: Any, eval_result: Any, predictions: Any, *, step: int | None = None
    ) -> None:
        store = self._resolve(ctx)
        if store is None:
            return
        eid, key = self.experiment_id, ctx.run_key or "run"
        name = benchmark_name(eval_result)
        metrics = benchmark_metrics(eval_result)
        now = time.time()
        store.append(
            eid, key, "evals", [{"name": name, "step": step, "ts": now, "metrics": metrics}]
        )
        rows = [
            {
                "benchmark": name,
                "step": step,
                **(dict(p) if isinstance(p, Mapping) else {"prediction": p}),
            }
            for p in (predictions or ())
        ]
        store.append(eid, key, "predictions", rows)

    def on_run_end(self, ctx: Any, run_result: Any, arm: Any) -> None:
        store = self._resolve(ctx)
        if store is None:
            return
        fields = {
            "status": getattr(run_result, "status", None),
            "metrics": getattr(run_result, "metrics", None),
            "error": getattr(run_result, "error", None),
        }
        store.update_run(self.experiment_id, ctx.run_key or "run", **json_ready(fields))

    def on_experiment_end(self, ctx: Any, result: Any) -> None:
        store = self._resolve(ctx)
        if store is None:
            return
        to_dict = getattr(result, "to_dict", None)
        summary = to_dict() if callable(to_dict) else json_ready(result)
        store.update_experiment(self.experiment_id, status="completed", result=summary)

    # -- loop scope ---------------------------------------------------------------

    def setup(self, state: LoopState) -> None:
        self._rows, self._writers = {}, {}
        self._run_key, self._trouble, self.degraded = None, None, None
        if state.rank != 0:
            return
        ctx = state.ctx
        store = self._resolve(ctx)
        if store is None:
            return
        self._run_key = ctx.run_key or "run"
        store.start_run(
            self.experiment_id,
            self._run_key,
            group=ctx.group_name,
            run_config=json_ready(ctx.run_config),
            num_steps=state.num_steps,
            start_step=state.start_step,
            run_dir=str(state.run_dir),
        )
        ctx.ids["run_id"] = f"{self.experiment_id}/{self._run_key}"

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: Any, metrics: dict[str, float]
    ) -> None:
        if self._run_key is not None:
            self._rows.setdefault("metrics", []).append(
                {"step": step_idx, "split": "train", "ts": time.time(), "metrics": metrics}
            )

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        if self._run_key is not None:
            self._rows.setdefault("evals", []).append(
                {"name": eval_name, "step": step_idx, "ts": time.time(), "metrics": metrics}
            )

    def on_checkpoint(self, state: LoopState, row: dict[str, Any]) -> None:
        if self._run_key is not None:
            self._rows.setdefault("checkpoints", []).append(json_ready(row))

    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> None:
        if self._run_key is None:
            return
        self.flush()
        try:
            self.store.update_run(
                self.experiment_id,
                self._run_key,
                status=artifacts.status,
                steps_completed=state.start_step + artifacts.steps_completed,
                stop_reason=artifacts.stop_reason,
                train_seconds=artifacts.train_seconds,
                error=artifacts.error,
                wandb_url=state.ctx.extras.get("wandb_url"),
            )
        except OSError as exc:
            self._trouble = Degraded(f"run.json not updated: {describe(exc)}")
            self._update_degraded()

    def flush(self) -> None:
        """Append the batch's rows: one whole write per row file (a ``LocalStore``'s
        through a ``RowWriter``, which holds what a full disk refuses)."""
        rows, self._rows = self._rows, {}
        if self._run_key is None:
            return
        for kind, batch in rows.items():
            if isinstance(self.store, LocalStore):
                writer = self._writer(kind)
                data = b"\n".join([encode_json(r) for r in batch]) + b"\n"
                writer.write(data, lambda b=batch: [r.get("step") for r in b])  # type: ignore[misc]
            else:
                self.store.append(self.experiment_id, self._run_key, kind, batch)
        self._update_degraded()

    def _writer(self, kind: RowKind) -> RowWriter:
        writer = self._writers.get(kind)
        if writer is None:
            assert self._run_key is not None
            assert self.experiment_id is not None
            path = self.store.rows_path(self.experiment_id, self._run_key, kind)
            writer = self._writers[kind] = RowWriter(path, fresh=False)
            writer.open()
        return writer

    def _update_degraded(self) -> None:
        self.degraded = degraded_of(list(self._writers.values()), self._trouble)

    def teardown(self, state: LoopState) -> None:
        self.flush()
        for writer in self._writers.values():
            writer.close()
        self._update_degraded()
        self._writers = {}
        self._run_key = None
