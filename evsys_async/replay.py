"""Replay: run any callbacks over a recorded run, after the fact.

A run's ``events.jsonl`` holds every event its callbacks saw, so callbacks
can see them again: regenerate a CSV or TensorBoard logs for a run that had
none, debug a new callback against a real stream, backfill a tracker from an
offline run. ``docs/replay.md`` has the format and the guarantees.

How it travels: a daemon thread reads and decodes the log a few blocks ahead
(:class:`~evsys_async.transports.jsonl.EventLogReader`), so the event loop
never waits on the disk or the decoder; the loop task publishes each event
through :meth:`EventBus.publish` onto a fresh bus whose subscribers are the
callbacks, each through the same
:class:`~evsys_async.callbacks._adapter.CallbackAdapter` a live run uses, with a
:class:`LoopState` rebuilt from the record (step, num_steps, start step, run
key, output dir). Publishing waits whenever the slowest callback falls a few
blocks behind, so memory stays bounded however long the log is.

Replay never writes into its source: callbacks write into a new run
directory, claimed as a run claims one (``<output_dir>/<run key>``, or the
next free ``<run key>-N``; ``output_dir`` defaults to ``runs``). A header
line that recurs in the log marks a resume: the callbacks are closed and set
up again with ``state.start_step`` of the resumed run, exactly as the resumed
run did, so their files come out as the live ones did.
"""

from __future__ import annotations

import difflib
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from ._util.log import get_logger
from ._util.rundir import claim_run_dir
from ._util.worker import DaemonWorker, Outcome
from .bus import EventBus, Subscription
from .callbacks import Callback
from .callbacks._adapter import CallbackAdapter
from .events import (
    CheckpointSaved,
    Envelope,
    Event,
    StepEnded,
    StopRequested,
    TrainEnded,
    TrainStarted,
    UnknownEvent,
    event_types,
)
from .state import CallbackHealth, LogContext, LoopArtifacts, LoopState
from .transports.jsonl import EventLogReader, LogBatch, LogHeader, SkippedLine

__all__ = ["EVENT_LOG", "ReplayReport", "event_log_path", "read_events", "replay"]

_log = get_logger()

#: the event log's name inside a run directory
EVENT_LOG = "events.jsonl"
#: where replayed runs go when no output_dir is given (as for a run)
DEFAULT_OUTPUT_DIR = "runs"
#: blocks the reading thread decodes ahead of the loop
_PREFETCH = 2
#: published blocks the slowest callback may be behind before publishing waits
_WINDOW = 4
#: the deadline for the callbacks to finish and close at the end of a segment
_CLOSE_TIMEOUT = 60.0


@dataclass
class ReplayReport:
    """What a replay read, published and skipped, and how each callback fared.

    ``events_read`` = ``events_published`` + ``events_filtered`` (left out by
    ``only``); ``only_unmatched`` maps each ``only`` name that matched no event
    to the closest event type name known or seen (``None`` if none is close):
    a typo, most likely. ``skipped`` lists the lines not read, each with its line number
    and reason: a truncated last line, and malformed lines (one nested too deep
    included) under ``skip_bad``. ``duplicates`` counts the envelopes left out
    because their ``(bus_id, seq)`` came earlier in the log (not in
    ``events_read``). ``unknown_types`` counts events of types not defined here
    (delivered as :class:`~evsys_async.events.UnknownEvent`). ``segments`` is 1,
    plus one per resume boundary. ``callback_report`` is per callback, as in a
    run's artifacts, summed over segments.
    """

    source: Path
    #: the run directory the callbacks wrote into (``None``: the log held no events)
    run_dir: Path | None
    #: the run key the log recorded (its header's, else its first event's)
    run_key: str
    header: LogHeader | None
    events_read: int = 0
    events_published: int = 0
    events_filtered: int = 0
    only_unmatched: dict[str, str | None] = field(default_factory=dict)
    skipped: list[SkippedLine] = field(default_factory=list)
    duplicates: int = 0
    unknown_types: dict[str, int] = field(default_factory=dict)
    segments: int = 0
    seconds: float = 0.0
    callback_report: dict[str, CallbackHealth] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every callback handled every event it was given (none failed, dropped
        by force, stuck or left behind). Skipped lines do not count here."""
        return all(
            not (h.failed or h.dropped - h.coalesced or h.pending or h.stuck)
            for h in self.callback_report.values()
        )


def event_log_path(source: str | os.PathLike[str]) -> Path:
    """The event log ``source`` names: a file, or a run directory's ``events.jsonl``.

    Raises ``FileNotFoundError`` saying which was missing and how a run gets one.
    """
    path = Path(source)
    if path.is_dir():
        log = path / EVENT_LOG
        if not log.is_file():
            raise FileNotFoundError(
                f"{path} has no {EVENT_LOG}: a run writes one when its callbacks include "
                "local_logger (or a JsonlSink is attached to its bus)"
            )
        return log
    if not path.is_file():
        raise FileNotFoundError(
            f"no such event log or run directory: {path} (give an events.jsonl file, or the "
            "run directory that holds one)"
        )
    return path


# -- reading ahead, in a thread ------------------------------------------------------------


class _Blocks:
    """The log's batches, decoded by a daemon thread a few blocks ahead of the loop."""

    def __init__(self, reader: EventLogReader) -> None:
        self.reader = reader
        self._worker = DaemonWorker(f"evsys-replay:{reader.path.name}")
        self._ahead: deque[Outcome] = deque()
        self._done = False

    async def next(self) -> LogBatch | None:
        """The next batch (``None`` at the end); raises what reading raised."""
        if self._done:
            return None
        while len(self._ahead) < _PREFETCH:
            self._ahead.append(self._worker.submit(self.reader.read))
        batch: LogBatch | None = await self._ahead.popleft().result()
        if batch is None:
            self._done = True
        else:
            self._ahead.append(self._worker.submit(self.reader.read))
        return batch

    def close(self) -> None:
        """Close the file in the thread, after the reads in flight; never blocks."""
        self._done = True
        try:
            self._worker.submit(self.reader.close)
        except Exception:  # no event loop left (a generator finalised late): close here
            self.reader.close()
        self._worker.close()


# -- replay --------------------------------------------------------------------------------


def _check_callbacks(callbacks: Iterable[Callback]) -> list[Callback]:
    out = list(callbacks)
    seen: dict[int, int] = {}
    for i, cb in enumerate(out):
        if not isinstance(cb, Callback):
            raise TypeError(
                f"replay: callbacks[{i}] is {cb!r}, not a Callback; pass Callback instances "
                "(ev.build_callbacks([{'kind': ..., 'params': ...}]) builds them from specs)"
            )
        j = seen.setdefault(id(cb), i)
        if j != i:
            raise ValueError(
                f"replay: callbacks[{i}] is the same {type(cb).__name__} instance as "
                f"callbacks[{j}]; pass one instance per subscription (build it twice)"
            )
        CallbackAdapter(cb, LoopState())  # hook signatures: refused before any file is made
    return out


def _check_only(only: str | Iterable[str] | None) -> frozenset[str] | None:
    """The event type names to keep. Names are not checked against the types known
    here: a user's type that is not importable here is a fine name (the report says
    which names matched nothing, with the closest type name)."""
    if only is None:
        return None
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only)]
    if not names or not all(names):
        raise ValueError(
            f"replay: only= takes event type names such as 'StepEnded,EvalEnded', got {only!r}"
        )
    return frozenset(names)


def _check_speed(speed: float | None) -> None:
    if speed is not None and not (isinstance(speed, int | float) and speed > 0):
        raise ValueError(
            f"replay: speed must be a number > 0 (2.0 = twice as fast as recorded; None = "
            f"as fast as possible), got {speed!r}"
        )


async def replay(
    source: str | os.PathLike[str],
    callbacks: Iterable[Callback],
    *,
    only: str | Iterable[str] | None = None,
    speed: float | None = None,
    skip_bad: bool = False,
    output_dir: str | os.PathLike[str] | None = None,
) -> ReplayReport:
    """Publish a recorded run's events, in order, to ``callbacks``; return the report.

    ``source`` is an ``events.jsonl`` or the run directory that holds one.
    ``callbacks`` are the same :class:`Callback` objects a run takes; their
    hooks get a :class:`LoopState` rebuilt from the record and write into a
    new run directory under ``output_dir`` (default ``runs``), never into the
    source. ``only`` keeps the events of these type names (``"StepEnded,EvalEnded"``
    or a list; subclasses included). ``speed=None`` replays as fast as
    possible; a number paces by the recorded timestamps (``2.0`` = twice as
    fast). The batch of a ``wants_batch`` callback is ``None``, and
    ``request_stop`` changes nothing: the record is fixed.

    Raises ``FileNotFoundError`` for a missing log, ``ValueError`` for a bad
    argument, and :class:`~evsys_async.EventDecodeError` naming ``file:line``
    for a malformed line (unless ``skip_bad``: counted in the report), a log
    of a newer format version, or another format; a line nested deeper than
    128 levels is malformed (found before it is decoded). A truncated last
    line is skipped and reported; a repeated envelope (the same ``bus_id`` and
    ``seq`` as an earlier one) is skipped and counted in ``duplicates``. When
    it raises or is cancelled, the callbacks have handled what was published
    before and closed their files.
    """
    path = event_log_path(source)
    cbs = _check_callbacks(callbacks)
    wanted = _check_only(only)
    _check_speed(speed)
    blocks = _Blocks(EventLogReader(path, skip_bad=skip_bad))
    session = _Replay(path, cbs, wanted, speed, output_dir, blocks)
    try:
        return await session.run()
    finally:
        blocks.close()


async def read_events(
    source: str | os.PathLike[str], *, skip_bad: bool = False
) -> AsyncIterator[Envelope]:
    """The envelopes of an event log, in order, read and decoded in a daemon thread.

    ``source`` is an ``events.jsonl`` or a run directory. Header lines are
    not yielded; an event of a type not defined here comes as an
    :class:`~evsys_async.events.UnknownEvent`. Raises as :func:`replay` does; a
    truncated last line (and, with ``skip_bad``, a malformed one) is skipped
    with a WARNING, and so are repeated envelopes (one WARNING with the count).
    To stop early, close the iterator:
    ``async with contextlib.aclosing(read_events(path)) as envelopes: ...``.
    """
    path = event_log_path(source)
    reader = EventLogReader(path, skip_bad=skip_bad)
    blocks = _Blocks(reader)
    try:
        while (batch := await blocks.next()) is not None:
            for envelope in batch.as_envelopes():
                yield envelope
    finally:
        blocks.close()
    for line in reader.skipped:
        _log.warning("event log line skipped", file=str(path), line=line.line, reason=line.reason)
    if reader.duplicates:
        _log.warning(
            "duplicated envelopes skipped (same bus_id and seq as an earlier line)",
            file=str(path),
            duplicates=reader.duplicates,
        )


class _Replay:
    """One replay: the segments of one log, published onto a bus each."""

    def __init__(
        self,
        path: Path,
        callbacks: list[Callback],
        wanted: frozenset[str] | None,
        speed: float | None,
        output_dir: str | os.PathLike[str] | None,
        blocks: _Blocks,
    ) -> None:
        self.path = path
        self.callbacks = callbacks
        self.wanted = wanted
        self.speed = speed
        self.root = Path(output_dir if output_dir is not None else DEFAULT_OUTPUT_DIR)
        self.blocks = blocks
        self.ctx: LogContext | None = None
        self.num_steps = 0
        self.read = 0
        self.published = 0
        self.filtered = 0
        self.unknown: dict[str, int] = {}
        self.checkpoints: list[dict[str, Any]] = []
        self._kept: dict[type, bool] = {}
        self.matched: set[str] = set()  # the ``only`` names that kept an event
        self._origin: tuple[float, float] | None = None  # (recorded ts, monotonic) for pacing
        self.health: list[CallbackHealth | None] = [None] * len(callbacks)
        self.names = [type(cb).__name__ for cb in callbacks]

    async def run(self) -> ReplayReport:
        started = time.perf_counter()
        batch = await self.blocks.next()
        header = batch.header if batch is not None else None
        report = ReplayReport(
            source=self.path, run_dir=None, run_key=_recorded_key(header, batch), header=header
        )
        while batch is not None:
            if self.ctx is None:  # the first events: claim the run dir, as a run does
                key, run_dir = claim_run_dir(self.root, report.run_key or "replay")
                self.ctx = LogContext(output_dir=self.root, run_key=key)
                report.run_dir = run_dir
            report.segments += 1
            batch = await self._segment(batch)
        report.events_read = self.read
        report.events_filtered = self.filtered
        report.events_published = self.published
        report.skipped = list(self.blocks.reader.skipped)
        report.duplicates = self.blocks.reader.duplicates
        report.unknown_types = dict(self.unknown)
        if self.wanted is not None:
            names = [*event_types(), *self.unknown]
            for name in sorted(self.wanted - self.matched):
                close = difflib.get_close_matches(name, names, n=1)
                report.only_unmatched[name] = close[0] if close else None
        report.callback_report = {
            name: h for name, h in zip(self.names, self.health, strict=True) if h is not None
        }
        report.seconds = time.perf_counter() - started
        return report

    # -- one segment: from a header (or the start) to the next header ---------------------

    def _state(self, batch: LogBatch) -> LoopState:
        """The state a segment's hooks get, from its header and first events."""
        start_step = batch.header.start_step if batch.header is not None else 0
        for envelope in batch.envelopes:
            event = envelope.event
            if type(event) is TrainStarted:
                self.num_steps, start_step = event.num_steps, event.start_step
                break
            if type(event) is StepEnded:
                self.num_steps = event.num_steps
                break
        assert self.ctx is not None
        return LoopState(
            num_steps=self.num_steps,
            output_dir=self.root,
            step=start_step,
            ctx=self.ctx,
            start_step=start_step,
        )

    async def _segment(self, batch: LogBatch) -> LogBatch | None:
        """Publish this batch and the ones after it up to the next header onto a fresh
        bus; close the callbacks (drain, teardown); return the batch that stopped it."""
        state = self._state(batch)
        adapters = [CallbackAdapter(cb, state) for cb in self.callbacks]  # checks hooks
        self._origin = None  # pacing starts again after a resume's downtime
        # lag reports would be noise: publishing waits for the slowest callback anyway
        async with EventBus(close_timeout=_CLOSE_TIMEOUT, lag_threshold=1 << 40) as bus:
            subs = [adapter.subscribe(bus) for adapter in adapters]
            marks: deque[int] = deque()
            next_batch: LogBatch | None = batch
            while next_batch is not None and (next_batch is batch or next_batch.header is None):
                envelopes = next_batch.envelopes
                self.read += len(envelopes)
                if self.speed is None:
                    last = self._publish(bus, state, envelopes)
                else:
                    last = await self._publish_paced(bus, state, envelopes)
                if last is not None:
                    marks.append(last)
                    if len(marks) > _WINDOW:  # bounded memory: wait for the slowest
                        mark = marks.popleft()
                        for sub in subs:
                            await sub.wait(mark)
                await anyio.lowlevel.checkpoint()
                next_batch = await self.blocks.next()
            await self._close(bus, adapters, subs)
        return next_batch

    async def _close(
        self, bus: EventBus, adapters: list[CallbackAdapter], subs: list[Subscription]
    ) -> None:
        deadline = time.monotonic() + _CLOSE_TIMEOUT

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        report = await bus.drain(left())
        closed = [True] * len(subs)

        async def close(i: int, sub: Subscription) -> None:
            closed[i] = await sub.aclose(left())

        async with anyio.create_task_group() as tg:
            for i, sub in enumerate(subs):
                tg.start_soon(close, i, sub)
        for i, (adapter, sub, ok) in enumerate(zip(adapters, subs, closed, strict=True)):
            st = sub.stats()
            now = CallbackHealth(
                delivered=st.delivered,
                failed=st.failed,
                dropped=st.dropped,
                pending=report.pending.get(sub.name, 0) if not ok else 0,
                stuck=sub.stuck or not ok,
                coalesced=st.coalesced,
                disabled=getattr(adapter.callback, "disabled_reason", None),
            )
            before = self.health[i]
            if before is None:
                self.names[i] = adapter.name
                self.health[i] = now
            else:
                self.health[i] = CallbackHealth(
                    delivered=before.delivered + now.delivered,
                    failed=before.failed + now.failed,
                    dropped=before.dropped + now.dropped,
                    pending=before.pending + now.pending,
                    stuck=before.stuck or now.stuck,
                    coalesced=before.coalesced + now.coalesced,
                    disabled=before.disabled or now.disabled,
                )

    # -- publishing ---------------------------------------------------------------------

    def _publish(self, bus: EventBus, state: LoopState, envelopes: Sequence[Any]) -> int | None:
        """Publish every kept event (the hot path: a few dict lookups per event)."""
        publish, accepts = bus.publish, self._accepts
        last: int | None = None
        published = 0
        for envelope in envelopes:
            event = envelope.event
            if accepts(state, event):
                last = publish(event)
                published += 1
        self.published += published
        return last

    async def _publish_paced(
        self, bus: EventBus, state: LoopState, envelopes: Sequence[Any]
    ) -> int | None:
        """As :meth:`_publish`, each event at its recorded time divided by ``speed``."""
        assert self.speed is not None
        last: int | None = None
        for envelope in envelopes:
            event = envelope.event
            if not self._accepts(state, event):
                continue
            if self._origin is None:
                self._origin = (event.ts, time.monotonic())
            else:
                due = self._origin[1] + (event.ts - self._origin[0]) / self.speed
                delay = due - time.monotonic()
                if 0 < delay < math.inf:
                    await anyio.sleep(delay)
            last = bus.publish(event)
            self.published += 1
        return last

    def _accepts(self, state: LoopState, event: Event) -> bool:
        """Follow the record in ``state``; is the event kept by ``only``?"""
        cls = type(event)
        if cls is StepEnded:
            state.step = event.step  # type: ignore[attr-defined]
        elif cls in _NOTED:
            self._note(state, event)
        if self.wanted is None:
            return True
        keep = self._kept.get(cls)
        if keep if keep is not None else self._keeps(event):
            return True
        self.filtered += 1
        return False

    def _keeps(self, event: Event) -> bool:
        """Does ``only`` keep this event? By its type's tag or any base's; an unknown
        event by its recorded type name."""
        wanted = self.wanted
        assert wanted is not None
        cls = type(event)
        names: set[Any]
        if cls is UnknownEvent:
            names = {event.event_type, "UnknownEvent"} & wanted  # type: ignore[attr-defined]
        else:
            names = {getattr(b, "__struct_config__", None) for b in cls.__mro__}
            names = {getattr(config, "tag", None) for config in names} & wanted
            self._kept[cls] = bool(names)
        self.matched |= names
        return bool(names)

    def _note(self, state: LoopState, event: Any) -> None:
        """What the rebuilt state learns from the rarer events."""
        cls = type(event)
        if cls is TrainStarted:
            state.num_steps = self.num_steps = event.num_steps
        elif cls is CheckpointSaved:
            self.checkpoints.append(dict(event.row))
        elif cls is StopRequested:
            state.stop_requested, state.stop_reason = True, event.reason
            state.stop_source = event.source
        elif cls is TrainEnded:
            # as the loop does: on_train_end gets the artifacts as they were at the end
            state.artifacts = LoopArtifacts(
                run_dir=state.run_dir,
                checkpoints=list(self.checkpoints),
                total_requested_steps=event.num_steps,
                steps_completed=event.steps_completed,
                status=event.status,
                stop_reason=event.stop_reason,
                train_seconds=event.train_seconds,
                error=event.error,
            )
        elif cls is UnknownEvent:
            self.unknown[event.event_type] = self.unknown.get(event.event_type, 0) + 1


#: the event types :meth:`_Replay._note` looks at (StepEnded has its own fast branch)
_NOTED = frozenset({TrainStarted, CheckpointSaved, StopRequested, TrainEnded, UnknownEvent})


def _recorded_key(header: LogHeader | None, batch: LogBatch | None) -> str:
    if header is not None and header.run_key:
        return header.run_key
    if batch is not None:
        for envelope in batch.envelopes:
            key: str = envelope.event.run_key
            if key:
                return key
    return ""
