"""``wandb_logger``: metrics, hyperparameters and predictions to Weights & Biases.

One W&B run per training run: ``wandb.init`` in ``setup``, ``run.log`` in the
hooks, ``run.finish`` in ``teardown`` — all in the callback's own thread
(``def`` hooks), so a slow network never stalls training. Train metrics are
logged after step ``i`` when ``(i + 1) % log_every == 0`` (the rule of every
cadence) and for the last step that ran, at ``step=step_idx``; eval metrics
as ``val/<key>`` (eval ``val``) or ``val/<eval_name>/<key>`` at the eval's
step, every one; benchmark evals (through ``dispatch``) as
``eval/<name>/<key>`` plus a ``wandb.Table`` of at most ``max_pred_rows``
predictions; each name behind ``prefix/`` when a ``prefix`` is given. The
run's config is its hyperparameters: ``ctx.run_config`` at ``init``, then
``TrainStarted.config`` (what the loop recorded, secrets redacted).

W&B's own environment variables keep their meaning: without ``mode`` the
mode comes from ``WANDB_MODE`` (``offline``, ``disabled``; W&B's default is
online), without ``project`` the project from ``WANDB_PROJECT`` (else the
experiment's name, else ``evsys-async``), the entity from ``WANDB_ENTITY``.
The run's URL goes to ``state.ctx.extras["wandb_url"]`` (``None`` offline)
for the callbacks after it. A failing ``wandb.init`` disables the callback
for that run with one WARNING and sets ``disabled_reason``, so the run's
callback report and the CLI's summary say it was off: training goes on. A
``run.log`` that raises (wandb's service gone) is counted, and the callback
is ``degraded`` ("N metrics not sent"), never "ok". ``finish`` runs in a
daemon thread joined for at most ``finish_timeout`` seconds, so a hung upload
cannot hold the run's shutdown (the thread is abandoned, with a WARNING, and
the callback is degraded: what was logged may not all be synced).

wandb is the optional extra ``wandb``, imported when the callback is built.
Rank 0 only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import msgspec

from .._util.log import get_logger
from ..errors import describe, import_extra
from ..events import Envelope, EvalEnded, StepEnded, TrainEnded, TrainStarted
from ..state import Degraded, LoopState
from ._format import Cadence, eval_metric_name
from ._hparams import hparams_of
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
        prefix: str = ""
        max_pred_rows: int = 100
        finish_timeout: float = 60.0

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        mode: Literal["online", "offline", "disabled", "shared"] | None = None,
        log_every: int = 1,
        prefix: str = "",
        max_pred_rows: int = 100,
        finish_timeout: float = 60.0,
    ) -> None:
        self._wandb = import_extra("wandb", "wandb", "wandb_logger")
        if log_every < 1:
            raise ValueError(f"wandb_logger: log_every must be >= 1, got {log_every}")
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
        self.prefix = prefix.strip("/")
        #: why the callback is off for the current run (``None``: it is on)
        self.disabled_reason: str | None = None
        self._cadence: Cadence[StepEnded] = Cadence()
        self._lost = self._unsent = 0
        self._missing_from: int | None = None

    # -- lifecycle (the callback's own thread) ------------------------------------

    def setup(self, state: LoopState) -> None:
        self.run = None
        self.disabled_reason = None
        self.degraded, self._cadence, self._missing_from = None, Cadence(), None
        self._lost = self._unsent = 0
        if state.rank != 0:
            return
        ctx = state.ctx
        config = hparams_of({}, state) or dict(ctx.config or {})
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

        self._log_unlogged(run)
        thread = threading.Thread(target=finish, name="evsys-wandb-finish", daemon=True)
        thread.start()
        thread.join(self.finish_timeout)
        if thread.is_alive():
            _log.warning(
                "wandb finish did not return in time; abandoned",
                callback=type(self).__name__,
                finish_timeout=self.finish_timeout,
            )
            self.degraded = self.degraded or Degraded(
                f"wandb finish did not return within {self.finish_timeout}s: "
                "what was logged may not all be synced"
            )
        elif errors:
            raise errors[0]

    # -- events --------------------------------------------------------------------

    def on_envelope(self, state: LoopState, envelope: Envelope) -> None:
        run = self.run
        if run is None:
            return
        event = envelope.event
        kind = type(event)
        if kind is StepEnded:
            assert isinstance(event, StepEnded)
            if self._cadence.take(event.step, event.num_steps, self.log_every, event):
                self._log(run, event.step, event.metrics.items())
        elif kind is EvalEnded:
            assert isinstance(event, EvalEnded)
            named = ((eval_metric_name(event.eval_name, k), v) for k, v in event.metrics.items())
            self._log(run, event.step, named)
        elif kind is TrainStarted:
            assert isinstance(event, TrainStarted)
            if event.config:  # the run's hyperparameters as the loop recorded them
                config = hparams_of(event.config, state)
                update = partial(run.config.update, config, allow_val_change=True)
                self._send("config", update)
        elif kind is TrainEnded:
            self._log_unlogged(run)

    def on_benchmark_eval(
        self, ctx: Any, eval_result: Any, predictions: Any, *, step: int | None = None
    ) -> None:
        run = self.run
        if run is None:
            return
        name = benchmark_name(eval_result)
        payload: dict[str, Any] = {
            self._name(f"eval/{name}/{k}"): float(v)
            for k, v in benchmark_metrics(eval_result).items()
            if isinstance(v, int | float)
        }
        rows = [r for r in list(predictions or ())[: self.max_pred_rows] if isinstance(r, Mapping)]
        if rows:
            columns = sorted({k for r in rows for k in r})
            table = self._wandb.Table(
                columns=columns, data=[[table_cell(r.get(c)) for c in columns] for r in rows]
            )
            payload[self._name(f"eval/{name}/predictions")] = table
        if payload:
            step_kw = {"step": step} if step is not None else {}
            self._send(f"{len(payload)} values", partial(run.log, payload, **step_kw), step)

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _log(self, run: Any, step: int, items: Any) -> None:
        data = {self._name(k): v for k, v in items}
        if data:
            self._send(f"{len(data)} metrics", partial(run.log, data, step=step), step, len(data))

    def _log_unlogged(self, run: Any) -> None:
        """The last step that ran is logged whatever the cadence."""
        last = self._cadence.left()
        if last is not None:
            self._log(run, last.step, last.metrics.items())

    def _send(self, what: str, call: Any, step: int | None = None, count: int = 0) -> None:
        """``call`` (a ``run.log``): what it could not hand to wandb is counted, and
        the callback is degraded, never "ok"."""
        try:
            call()
        except Exception as exc:
            if not self._lost and not self._unsent:
                _log.warning(
                    "wandb did not take what was logged; counted as lost",
                    callback=type(self).__name__,
                    what=what,
                    error=describe(exc),
                )
            self._lost += count
            self._unsent += 0 if count else 1
            if step is not None and (self._missing_from is None or step < self._missing_from):
                self._missing_from = step
            lost = f"{self._lost} metrics not sent" + (
                f", {self._unsent} other records" if self._unsent else ""
            )
            self.degraded = Degraded(
                f"{lost}: {describe(exc)}",
                rows_lost=self._lost,
                missing_from_step=self._missing_from,
            )
