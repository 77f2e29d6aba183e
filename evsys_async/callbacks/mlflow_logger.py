"""``mlflow``: metrics, params and tags to an MLflow tracking store, from a sender thread.

Where: the tracking URI from ``tracking_uri``, else ``MLFLOW_TRACKING_URI``,
else a SQLite store in the run's output directory
(``sqlite:///<output_dir>/mlflow.db``, MLflow's recommended local backend;
``mlflow ui --backend-store-uri`` that URI shows it). The experiment is
``experiment``, else ``MLFLOW_EXPERIMENT_NAME``, else the output directory's
name (an :class:`~evsys_async.Experiment`'s own directory); the run is named by
the run key. An experiment's arm is a parent run, its runs nested under it
(``mlflow.parentRunId``). Params are the run's hyperparameters
(``TrainStarted.config``, flattened to ``a/b``); tags the package version,
rank, world size, run key, run directory and group, plus ``tags``. A resume
continues the run its first segment made (its id is kept in the run dir's
``claims.json``). Where it logs is :attr:`MlflowLoggerCallback.location`, an
INFO line at ``setup``, and ``ctx.extras["mlflow_tracking_uri"]`` /
``["mlflow_run_id"]``.

Metrics: train metrics after step ``i`` when ``(i + 1) % log_every == 0`` and
for the last step that ran, every eval (``val/<key>``), benchmark metrics
(``eval/<name>/<key>``), each behind ``prefix/``; at their steps, with their
events' times as timestamps (a replay keeps the recorded clock); a name MLflow
refuses has its characters replaced by ``_`` (one WARNING per name).

Never blocking: the hooks only buffer; ``flush`` hands each batch to a sender
thread of this callback's own, which creates the experiment and run and calls
``MlflowClient.log_batch`` (1,000 metrics a call). A failure that may pass (a
server down, a 5xx, a locked database) is retried with backoff (0.5 s doubling
to 30 s) while up to ``max_buffered`` metrics wait; past that bound new metrics
are dropped and counted. A refusal (a 4xx: a param whose value changed) drops
that batch and says so. ``teardown`` ends the run (FINISHED, FAILED or KILLED)
and gives the sender ``finish_timeout`` seconds; whatever was not sent by then
makes the callback ``degraded`` ("N metrics not sent"), never "ok".

mlflow is the optional extra ``mlflow``, imported in ``setup`` (its import
takes about a second, paid in this callback's thread). Rank 0 only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec

from .._util.log import get_logger
from .._util.secrets import MASK, redact_url
from .._version import __version__
from ..errors import import_extra, missing_extra
from ..events import Envelope, EvalEnded, StepEnded, TrainEnded, TrainStarted
from ..state import LoopState
from ._format import Cadence, eval_metric_name
from ._hparams import flat_hparams, hparams_of
from ._mlflow import Plan, Point, Sender
from ._values import benchmark_metrics, benchmark_name
from .base import Callback
from .registry import register_callback

__all__ = ["MlflowLoggerCallback"]

_log = get_logger()

#: how a run's end maps to an MLflow run status
_STATUS = {
    "completed": "FINISHED",
    "stopped": "FINISHED",
    "failed": "FAILED",
    "cancelled": "KILLED",
}
#: MLflow's limits: a param value's length, a name's
_PARAM_LENGTH, _KEY_LENGTH = 6000, 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


@register_callback("mlflow")
class MlflowLoggerCallback(Callback):
    """Log to MLflow (see the module docstring). Raises
    :class:`~evsys_async.MissingExtraError` when mlflow is not installed and
    ``ValueError`` for a bad number."""

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        tracking_uri: str | None = None
        experiment: str | None = None
        tags: dict[str, str] | None = None
        log_every: int = 1
        prefix: str = ""
        max_buffered: int = 100_000
        finish_timeout: float = 30.0

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        tags: dict[str, str] | None = None,
        log_every: int = 1,
        prefix: str = "",
        max_buffered: int = 100_000,
        finish_timeout: float = 30.0,
    ) -> None:
        if importlib.util.find_spec("mlflow") is None:  # the import itself waits for setup
            raise missing_extra("mlflow", "mlflow", "mlflow")
        for name, value, least in (("log_every", log_every, 1), ("max_buffered", max_buffered, 1)):
            if value < least:
                raise ValueError(f"mlflow: {name} must be >= {least}, got {value}")
        if finish_timeout <= 0:
            raise ValueError(f"mlflow: finish_timeout must be > 0 seconds, got {finish_timeout}")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.tags = dict(tags or {})
        self.log_every = log_every
        self.prefix = prefix.strip("/")
        self.max_buffered = max_buffered
        self.finish_timeout = finish_timeout
        #: the tracking URI this run logs to, credentials masked (set in ``setup``)
        self.location: str | None = None
        self._sender: Sender | None = None
        # a deque: a benchmark hook run by dispatch in another thread adds to it too
        self._points: deque[Point] = deque()
        self._cadence: Cadence[StepEnded] = Cadence()
        self._status = "FINISHED"
        self._renamed: dict[str, str] = {}

    # -- lifecycle (the callback's own thread) ------------------------------------

    def setup(self, state: LoopState) -> None:
        self._sender, self._cadence, self._status = None, Cadence(), "FINISHED"
        self._points.clear()
        self.degraded = None
        if state.rank != 0:
            return
        client_cls = import_extra("mlflow", "mlflow", "mlflow").MlflowClient
        uri = self._uri(state)
        plan = Plan(
            experiment=self.experiment
            or os.environ.get("MLFLOW_EXPERIMENT_NAME")
            or Path(state.output_dir).resolve().name
            or "evsys-async",
            run_name=state.ctx.run_key or "run",
            group=state.ctx.group_name,
            tags=self._run_tags(state),
            output_dir=str(Path(state.output_dir).resolve()),
            run_dir=state.run_dir,
            claim=f"mlflow {_masked(uri)}",
            resume=state.start_step > 0,
            artifacts=None if _given_uri(self.tracking_uri) else _artifact_root(state),
        )
        self._sender = Sender(client_cls(tracking_uri=uri), plan, self.max_buffered, state)
        self._sender.start()
        self.location = _masked(uri)
        state.ctx.extras["mlflow_tracking_uri"] = self.location
        _log.info(
            "mlflow logs to",
            tracking_uri=self.location,
            experiment=plan.experiment,
            run=plan.run_name,
        )

    def _uri(self, state: LoopState) -> str:
        given = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if given:
            return given
        path = Path(state.output_dir).resolve() / "mlflow.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

    def _run_tags(self, state: LoopState) -> dict[str, str]:
        tags = {
            "evsys.version": __version__,
            "evsys.rank": str(state.rank),
            "evsys.world_size": str(state.world_size),
            "evsys.run_key": state.ctx.run_key,
            "evsys.run_dir": str(state.run_dir.resolve()),
        }
        if state.ctx.group_name:
            tags["evsys.group"] = state.ctx.group_name
        return {**tags, **self.tags}

    def teardown(self, state: LoopState) -> None:
        sender, self._sender = self._sender, None
        if sender is None:
            return
        self._take_unlogged()
        sender.put(self._drain())
        self.degraded = sender.finish(self._status, self.finish_timeout)

    def flush(self) -> None:
        sender = self._sender
        if sender is not None:
            sender.put(self._drain())
            self.degraded = sender.degraded()

    def _drain(self) -> list[Point]:
        points = self._points
        return [points.popleft() for _ in range(len(points))]

    # -- events -------------------------------------------------------------------

    def on_envelope(self, state: LoopState, envelope: Envelope) -> None:
        sender = self._sender
        if sender is None:
            return
        event = envelope.event
        kind = type(event)
        if kind is StepEnded:
            assert isinstance(event, StepEnded)
            if self._cadence.take(event.step, event.num_steps, self.log_every, event):
                self._add(event.ts, event.step, event.metrics.items())
        elif kind is EvalEnded:
            assert isinstance(event, EvalEnded)
            named = ((eval_metric_name(event.eval_name, k), v) for k, v in event.metrics.items())
            self._add(event.ts, event.step, named)
        elif kind is TrainStarted:
            assert isinstance(event, TrainStarted)
            params = flat_hparams(hparams_of(event.config, state))
            sender.set_params({self._key(k): str(v)[:_PARAM_LENGTH] for k, v in params.items()})
        elif kind is TrainEnded:
            assert isinstance(event, TrainEnded)
            self._take_unlogged()
            self._status = _STATUS.get(event.status, "FINISHED")

    def on_benchmark_eval(
        self, ctx: Any, eval_result: Any, predictions: Any, *, step: int | None = None
    ) -> None:
        if self._sender is None:
            return
        name = benchmark_name(eval_result)
        items = [
            (f"eval/{name}/{k}", v)
            for k, v in benchmark_metrics(eval_result).items()
            if isinstance(v, int | float)
        ]
        self._add(time.time(), step or 0, items)

    def _add(self, ts: float, step: int, items: Any) -> None:
        prefix = f"{self.prefix}/" if self.prefix else ""
        ms = int(ts * 1000)
        self._points.extend((self._key(f"{prefix}{k}"), float(v), ms, step) for k, v in items)

    def _take_unlogged(self) -> None:
        """The last step that ran is logged whatever the cadence."""
        last = self._cadence.left()
        if last is not None:
            self._add(last.ts, last.step, last.metrics.items())

    def _key(self, name: str) -> str:
        """``name`` as MLflow takes it: its characters and path-like parts checked."""
        known = self._renamed.get(name)
        if known is not None:
            return known
        parts = _BAD_KEY_CHARS.sub("_", name).split("/")
        key = "/".join(p if p not in ("", ".", "..") else "_" for p in parts)[:_KEY_LENGTH]
        if key != name:
            _log.warning("mlflow: a name MLflow refuses is logged as", name=name, logged_as=key)
        self._renamed[name] = key
        return key


def _masked(uri: str) -> str:
    """The URI with its credentials masked (a path-like URI, ``sqlite:////x``, as it is)."""
    masked = redact_url(uri)
    return masked if MASK in masked else uri


def _given_uri(uri: str | None) -> bool:
    return bool(uri or os.environ.get("MLFLOW_TRACKING_URI"))


def _artifact_root(state: LoopState) -> str:
    """Artifacts of an experiment in the default store stay beside it, not in ``./mlruns``."""
    return (Path(state.output_dir).resolve() / "mlartifacts").as_uri()
