"""``wandb_logger``: metrics and predictions to Weights & Biases.

One W&B run per training run: ``wandb.init`` in ``setup``, ``run.log`` in the
hooks, ``run.finish`` in ``teardown`` — all in the callback's own thread
(``def`` hooks), so a slow network never stalls training. Train metrics are
logged after step ``i`` when ``(i + 1) % log_every == 0`` (the rule of every
cadence) at ``step=step_idx``; eval metrics as ``val/<key>`` (eval ``val``) or
``val/<eval_name>/<key>`` at the eval's step; benchmark evals (through
``dispatch``) as ``eval/<name>/<key>`` plus a ``wandb.Table`` of at most
``max_pred_rows`` predictions.

W&B's own environment variables keep their meaning: without ``mode`` the
mode comes from ``WANDB_MODE`` (``offline``, ``disabled``; W&B's default is
online), without ``project`` the project from ``WANDB_PROJECT`` (else the
experiment's name, else ``evsys-async``), the entity from ``WANDB_ENTITY``.
The run's URL goes to ``state.ctx.extras["wandb_url"]`` (``None`` offline)
for the callbacks after it. A failing ``wandb.init`` disables the callback
for that run with one WARNING and sets ``disabled_reason``, so the run's
callback report and the CLI's summary say it was off: training goes on. ``finish`` runs in a daemon
thread joined for at most ``finish_timeout`` seconds, so a hung upload cannot
hold the run's shutdown (the thread is abandoned, with a WARNING).

wandb is the optional extra ``wandb``, imported when the callback is built.
Rank 0 only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from .._util.log import get_logger
from ..errors import describe, import_extra
from ..state import LoopState
from ._format import due, eval_metric_name
from ._values import benchmark_metrics, benchmark_name, table_cell
from .base import Callback
from .registry import register_callback

__all__ = ["WandbLoggerCallback"]

_log = get_logger()


@register_callback("wandb_logger")
class WandbLoggerCallback(Callback):
    """Log to W&B. Raises :class:`~evsys_async.MissingExtraError` when wandb is missing."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        project: str | None = None
        entity: str | None = None
        name: str | None = None
        mode: Literal["online", "offline", "disabled", "shared"] | None = None
        log_every: int = 1
        max_pred_rows: int = 100
        finish_timeout: float = 60.0

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        mode: Literal["online", "offline", "disabled", "shared"] | None = None,
        log_every: int = 1,
        max_pred_rows: int = 100,
        finish_timeout: float = 60.0,
    ) -> None:
        self._wandb = import_extra("wandb", "wandb", "wandb_logger")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        if finish_timeout <= 0:
            raise ValueError(f"finish_timeout must be > 0 seconds, got {finish_timeout}")
        self.project = project
        self.entity = entity
        self.run_name = name
        self.mode = mode
        self.log_every = log_every
        self.max_pred_rows = max(0, max_pred_rows)
        self.finish_timeout = finish_timeout
        self.run: Any = None
        #: why the callback is off for the current run (``None``: it is on)
        self.disabled_reason: str | None = None

    # -- lifecycle (the callback's own thread) ------------------------------------

    def setup(self, state: LoopState) -> None:
        self.run = None
        self.disabled_reason = None
        if state.rank != 0:
            return
        ctx = state.ctx
        config = dict(ctx.run_config) if ctx.run_config else dict(ctx.config or {})
        options: dict[str, Any] = {}
        if self.mode is not None:  # else W&B reads WANDB_MODE
            options["mode"] = self.mode
        if self.project is not None or not os.environ.get("WANDB_PROJECT"):
            options["project"] = self.project or str(ctx.config.get("experiment") or "evsys-async")
        try:
            run_dir = state.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
            self.run = self._wandb.init(
                entity=self.entity,
                name=self.run_name or ctx.run_key or None,
                group=ctx.group_name,
                dir=str(run_dir),
                config=config,
                reinit="create_new",
                **options,
            )
        except Exception as exc:
            self.run = None
            self.disabled_reason = f"wandb init failed: {describe(exc)}"
            _log.warning(
                "wandb init failed; wandb_logger is off for this run",
                callback=type(self).__name__,
                run_key=ctx.run_key,
                error=describe(exc),
            )
            return
        ctx.extras["wandb_url"] = getattr(self.run, "url", None)

    def teardown(self, state: LoopState) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        errors: list[BaseException] = []

        def finish() -> None:
            try:
                run.finish()
            except BaseException as exc:  # reported below, from the callback's thread
                errors.append(exc)

        thread = threading.Thread(target=finish, name="evsys-wandb-finish", daemon=True)
        thread.start()
        thread.join(self.finish_timeout)
        if thread.is_alive():
            _log.warning(
                "wandb finish did not return in time; abandoned",
                callback=type(self).__name__,
                finish_timeout=self.finish_timeout,
            )
        elif errors:
            raise errors[0]

    # -- hooks --------------------------------------------------------------------

    def on_step_end(
        self, state: LoopState, step_idx: int, batch: Any, metrics: dict[str, float]
    ) -> None:
        run = self.run
        if run is not None and due(step_idx, self.log_every) and metrics:
            run.log(dict(metrics), step=step_idx)

    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        run = self.run
        if run is not None and metrics:
            run.log({eval_metric_name(eval_name, k): v for k, v in metrics.items()}, step=step_idx)

    def on_benchmark_eval(
        self, ctx: Any, eval_result: Any, predictions: Any, *, step: int | None = None
    ) -> None:
        run = self.run
        if run is None:
            return
        name = benchmark_name(eval_result)
        payload: dict[str, Any] = {
            f"eval/{name}/{k}": float(v)
            for k, v in benchmark_metrics(eval_result).items()
            if isinstance(v, int | float)
        }
        rows = [r for r in list(predictions or ())[: self.max_pred_rows] if isinstance(r, Mapping)]
        if rows:
            columns = sorted({k for r in rows for k in r})
            table = self._wandb.Table(
                columns=columns, data=[[table_cell(r.get(c)) for c in columns] for r in rows]
            )
            payload[f"eval/{name}/predictions"] = table
        if payload:
            run.log(payload, **({"step": step} if step is not None else {}))
