"""``tensorboard_logger``: scalars and hyperparameters into TensorBoard event files.

Train metrics under their own names after step ``i`` when ``(i + 1) %
log_every == 0`` and for the last step that ran; eval metrics under
``val/<key>`` (eval ``val``) or ``val/<eval_name>/<key>`` at the eval's step,
every one; benchmark metrics (through ``dispatch``) under ``eval/<name>/<key>``;
each name behind ``prefix/`` when a ``prefix`` is given. Every point carries
the time its event was made as its wall time, so a replay draws the recorded
run's clock, not its own. The run's hyperparameters (``TrainStarted.config``)
go to TensorBoard's hparams plugin (a session-start record, and a session-end
record with the run's status) and to ``hparams.yaml`` beside the event files.

Where: ``<run dir>/tensorboard`` by default; a relative ``log_dir`` is inside
the run dir; an absolute one (``~`` and ``$VAR`` expand) is shared by many
runs, so the callback claims ``<log_dir>/<run_key>`` there as a run claims its
run dir (``<run_key>-1``, ... when taken; emptied with ``overwrite``; kept by
a resume), and never writes into another run's event files. The directory is
:attr:`TensorBoardLoggerCallback.location` and ``ctx.extras["tensorboard_log_dir"]``.

tensorboardX is the optional extra ``tensorboard``: its protobufs build the
records, which :mod:`._tfevents` writes in this callback's own thread, once
per delivered batch, whole records or none; what the disk refuses is held and
retried, and what is lost makes the callback ``degraded``. A resumed run (and
its replay) writes a new file whose first record purges what the first
segment logged from the resume step on. Rank 0 only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import msgspec

from .._util.files import write_atomic
from .._util.log import get_logger
from .._util.paths import expand_path
from .._util.rundir import check_inside, claim_logger_dir, logger_path
from ..errors import import_extra
from ..events import Envelope, EvalEnded, StepEnded, TrainEnded, TrainStarted
from ..state import LoopState
from ._format import Cadence, eval_metric_name
from ._hparams import flat_hparams, hparams_of, hparams_yaml
from ._tfevents import EventFile, frame, masked_crc32c
from ._values import benchmark_metrics, benchmark_name
from .base import Callback
from .registry import register_callback

__all__ = ["TensorBoardLoggerCallback"]

_log = get_logger()

#: the hparams plugin's session status for each way a run ends
_STATUS = {
    "completed": "STATUS_SUCCESS",
    "stopped": "STATUS_SUCCESS",
    "failed": "STATUS_FAILURE",
    "cancelled": "STATUS_ABORTED",
}


@register_callback("tensorboard_logger")
class TensorBoardLoggerCallback(Callback):
    """Log scalars and hyperparameters to TensorBoard (see the module docstring).

    ``flush_secs`` is how often the event file is ``fsync``-ed (records reach
    the file at every batch). Raises :class:`~evsys_async.MissingExtraError`
    when tensorboardX is not installed, ``ValueError`` for a bad number and
    :class:`~evsys_async.ConfigError` for a ``log_dir`` naming an unset variable.
    """

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        log_dir: str | None = None
        flush_secs: int = 30
        log_every: int = 1
        prefix: str = ""

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        flush_secs: int = 30,
        log_every: int = 1,
        prefix: str = "",
    ) -> None:
        import_extra("tensorboardX", "tensorboard", "tensorboard_logger")
        if flush_secs < 1:
            raise ValueError(f"tensorboard_logger: flush_secs must be >= 1, got {flush_secs}")
        if log_every < 1:
            raise ValueError(f"tensorboard_logger: log_every must be >= 1, got {log_every}")
        what = "tensorboard_logger log_dir"
        given = expand_path(log_dir, what=what) if log_dir is not None else None
        self.log_dir = check_inside(given, what=what) if given is not None else None
        self.flush_secs = flush_secs
        self.log_every = log_every
        self.prefix = prefix.strip("/")
        #: the directory this run's event files are in (set in ``setup``)
        self.location: str | None = None
        self.run_log_dir: Path | None = None
        self._file: EventFile | None = None
        self._protos: Any = None
        self._cadence: Cadence[StepEnded] = Cadence()
        self._resume_step = 0
        self._started = False

    # -- lifecycle (the callback's own thread) ------------------------------------

    def setup(self, state: LoopState) -> None:
        self._file, self._cadence, self._started = None, Cadence(), False
        if state.rank != 0:
            return
        path = self._claim(state)
        self._protos = _Protos()
        events = EventFile(path, sync_secs=self.flush_secs)
        events.open()
        self._file, self.run_log_dir, self.location = events, path, str(path)
        self._resume_step = state.start_step
        state.ctx.extras["tensorboard_log_dir"] = str(path)
        _log.info("tensorboard_logger writes to", log_dir=str(path), run_key=state.ctx.run_key)

    def _claim(self, state: LoopState) -> Path:
        if self.log_dir is None:
            path = state.run_dir / "tensorboard"
            path.mkdir(parents=True, exist_ok=True)
            return path
        if not self.log_dir.is_absolute():  # inside the run dir, which the run claimed
            path = logger_path(self.log_dir, state.run_dir, what="tensorboard_logger log_dir")
            path.mkdir(parents=True, exist_ok=True)
            return path
        return claim_logger_dir(
            self.log_dir,
            state.ctx.run_key or "run",
            state.run_dir,
            overwrite=state.overwrite,
            resume=state.start_step > 0,
            what="tensorboard_logger log_dir",
        )

    def teardown(self, state: LoopState) -> None:
        events, self._file = self._file, None
        if events is None:
            return
        self._log_unlogged(events)
        events.close()
        self.degraded = events.degraded
        self._protos = None  # modules: the callback pickles again for a next run

    def flush(self) -> None:
        events = self._file
        if events is not None:
            events.write()
            self.degraded = events.degraded

    # -- events -------------------------------------------------------------------

    def on_envelope(self, state: LoopState, envelope: Envelope) -> None:
        events = self._file
        if events is None:
            return
        event = envelope.event
        kind = type(event)
        if kind is StepEnded:
            assert isinstance(event, StepEnded)
            if self._cadence.take(event.step, event.num_steps, self.log_every, event):
                self._scalars(events, event.ts, event.step, event.metrics.items())
        elif kind is EvalEnded:
            assert isinstance(event, EvalEnded)
            named = ((eval_metric_name(event.eval_name, k), v) for k, v in event.metrics.items())
            self._scalars(events, event.ts, event.step, named)
        elif kind is TrainStarted:
            assert isinstance(event, TrainStarted)
            self._hparams(events, state, event)
        elif kind is TrainEnded:
            assert isinstance(event, TrainEnded)
            self._log_unlogged(events)
            record = self._protos.session_end(event.ts, _STATUS.get(event.status, "STATUS_UNKNOWN"))
            self._add(events, event.ts, record, None)

    def on_benchmark_eval(
        self, ctx: Any, eval_result: Any, predictions: Any, *, step: int | None = None
    ) -> None:
        events = self._file
        if events is None:
            return
        name = benchmark_name(eval_result)
        items = [
            (f"eval/{name}/{k}", float(v))
            for k, v in benchmark_metrics(eval_result).items()
            if isinstance(v, int | float)
        ]
        self._scalars(events, time.time(), step or 0, items)

    # -- records --------------------------------------------------------------------

    def _scalars(self, events: EventFile, ts: float, step: int, items: Any) -> None:
        prefix = f"{self.prefix}/" if self.prefix else ""
        values = [(f"{prefix}{k}", float(v)) for k, v in items]
        if values:
            self._add(events, ts, self._protos.scalars(ts, step, values), step)

    def _hparams(self, events: EventFile, state: LoopState, event: TrainStarted) -> None:
        config = hparams_of(event.config, state)
        if not config:
            return
        self._add(
            events, event.ts, self._protos.session_start(event.ts, flat_hparams(config)), None
        )
        assert self.run_log_dir is not None
        write_atomic(self.run_log_dir / "hparams.yaml", hparams_yaml(config))

    def _add(self, events: EventFile, ts: float, record: bytes, step: int | None) -> None:
        if not self._started:  # the file's first records: its version, and a resume's purge
            self._started = True
            events.add(self._protos.header(ts), None)
            if self._resume_step > 0:
                events.add(self._protos.purge(ts, self._resume_step), self._resume_step)
        events.add(record, step)

    def _log_unlogged(self, events: EventFile) -> None:
        """The last step that ran is logged whatever the cadence."""
        last = self._cadence.left()
        if last is not None:
            self._scalars(events, last.ts, last.step, last.metrics.items())


class _Protos:
    """tensorboardX's protobufs, framed as TFRecords (imported when a run starts)."""

    def __init__(self) -> None:
        from tensorboardX.proto import event_pb2, summary_pb2

        self.event_pb2, self.summary_pb2, self.crc = event_pb2, summary_pb2, masked_crc32c()

    def _framed(self, event: Any) -> bytes:
        return frame(event.SerializeToString(), self.crc)

    def header(self, ts: float) -> bytes:
        return self._framed(self.event_pb2.Event(wall_time=ts, file_version="brain.Event:2"))

    def purge(self, ts: float, step: int) -> bytes:
        """A session start at ``step``: TensorBoard drops what earlier files logged from it on."""
        log = self.event_pb2.SessionLog(status=self.event_pb2.SessionLog.START)
        return self._framed(self.event_pb2.Event(wall_time=ts, step=step, session_log=log))

    def scalars(self, ts: float, step: int, values: list[tuple[str, float]]) -> bytes:
        value = self.summary_pb2.Summary.Value
        summary = self.summary_pb2.Summary(value=[value(tag=t, simple_value=v) for t, v in values])
        return self._framed(self.event_pb2.Event(wall_time=ts, step=step, summary=summary))

    def session_start(self, ts: float, hparams: dict[str, Any]) -> bytes:
        from tensorboardX.summary import hparams as hparams_summaries

        _, start, _ = hparams_summaries(hparams, {})
        return self._framed(self.event_pb2.Event(wall_time=ts, summary=start))

    def session_end(self, ts: float, status: str) -> bytes:
        from tensorboardX.proto.api_pb2 import Status
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo

        data = HParamsPluginData(
            session_end_info=SessionEndInfo(status=Status.Value(status), end_time_secs=ts),
            version=0,
        )
        plugin = self.summary_pb2.SummaryMetadata.PluginData(
            plugin_name="hparams", content=data.SerializeToString()
        )
        value = self.summary_pb2.Summary.Value(
            tag="_hparams_/session_end_info",
            metadata=self.summary_pb2.SummaryMetadata(plugin_data=plugin),
        )
        return self._framed(
            self.event_pb2.Event(wall_time=ts, summary=self.summary_pb2.Summary(value=[value]))
        )
