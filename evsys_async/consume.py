"""A run followed from another process or host: ``consume`` runs callbacks, ``tail`` prints.

Both read the run's Redis stream (``evsys:<run_key>:events``) and end once
every rank of the run has ended: after ``world_size`` ``TrainEnded`` (the
world size comes from the ranks' ``TrainStarted``, or is given). A rank that
ended and started again (a resume) counts once it ends again.

:func:`consume` is an at-least-once consumer group member
(:class:`~evsys_async.transports.RedisStreamSource`): it runs any callbacks
(CSV, TensorBoard, W&B, a user's) on a local bus, acknowledging each batch
only after every callback handled it. Its files go to a run directory of
their own under ``output_dir`` (every run is a new run: ``<run_key>``, else
``<run_key>-1``, ...), never into the producer's. Killed and started again
with the same group, it resumes like ``run(start_step=k)``: the directory it
used is recorded in Redis (``evsys:<run_key>:consumers``), the writers drop
their rows from step k on, and the entries of step k and later are handed to
them again, so its files end as an uninterrupted consumer's.

:func:`tail` is an observer (``XREAD``, no group, nothing acknowledged): the
progress lines of one rank and one line per rank's end.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio

from ._util.aio import shielded
from ._util.log import get_logger
from ._util.rundir import claim_run_dir
from ._util.secrets import redact_url
from ._util.worker import in_daemon_thread
from .bus import EventBus, Subscription
from .callbacks import Callback
from .callbacks._adapter import CallbackAdapter
from .callbacks._format import due, fmt_value
from .events import Envelope, EvalEnded, Event, StepEnded, TrainEnded, TrainStarted
from .state import CallbackHealth, LogContext, LoopState
from .transports import RedisStreamSource

__all__ = ["ConsumeResult", "RanksEnded", "TailResult", "consume", "tail"]

_log = get_logger()


class RanksEnded:
    """``until=`` for :meth:`RedisStreamSource.forward`: true once every rank has ended.

    ``world_size`` fixes the number of ranks; by default it is the largest
    ``world_size`` of the ``TrainStarted`` seen (1 if none). With ``rank``, only
    that rank's end counts. A ``TrainStarted`` after a rank's ``TrainEnded``
    (a resumed run) makes it a running rank again.
    """

    def __init__(self, world_size: int | None = None, rank: int | None = None) -> None:
        if world_size is not None and world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.fixed = world_size
        self.world_size = world_size or 1
        self.rank = rank
        #: the TrainEnded of each rank that has ended (and not started again)
        self.ended: dict[int, TrainEnded] = {}

    def __call__(self, event: Event) -> bool:
        if isinstance(event, TrainStarted):
            if self.fixed is None:
                self.world_size = max(self.world_size, event.world_size)
            self.ended.pop(event.rank, None)
        elif isinstance(event, TrainEnded):
            self.ended[event.rank] = event
        if self.rank is not None:
            return self.rank in self.ended
        return len(self.ended) >= self.world_size


def _health(adapter: CallbackAdapter, sub: Subscription, closed: bool) -> CallbackHealth:
    st = sub.stats()
    return CallbackHealth(
        delivered=st.delivered,
        failed=st.failed,
        dropped=st.dropped,
        pending=st.pending if not closed else 0,
        stuck=sub.stuck or not closed,
        coalesced=st.coalesced,
        disabled=getattr(adapter.callback, "disabled_reason", None),
    )


@dataclass
class ConsumeResult:
    """What :func:`consume` did: where the files went, from which step (``resumed_at``:
    k for a restarted consumer, else ``None``), how many events it published, each
    rank's ``TrainEnded``, the source's counters and each callback's report."""

    run_dir: Path
    resumed_at: int | None
    published: int
    ended: dict[int, TrainEnded] = field(default_factory=dict)
    source: Any = None
    callback_report: dict[str, CallbackHealth] = field(default_factory=dict)


def _consumer_dir(
    source: RedisStreamSource, run_key: str, root: Path, resumed: bool
) -> tuple[Path, bool]:
    """The run dir for this consumer: the one it used before when resuming, else a new one.
    Returns the dir and whether it is the earlier one."""
    if resumed:
        recorded = source.recorded_dir()
        if recorded is not None:
            earlier = Path(recorded)
            if earlier.is_dir() and earlier.parent == root.resolve():
                claim_run_dir(earlier.parent, earlier.name, resume=True)
                return earlier, True
        _log.warning(
            "this consumer group consumed part of the stream before, but its files are not "
            "under the output dir; a new run dir gets the events from the resume step on",
            group=source.group,
            consumer=source.consumer,
            recorded=recorded,
            output_dir=str(root),
        )
    _, run_dir = claim_run_dir(root, run_key)
    return run_dir.resolve(), False


async def consume(
    url: str,
    run_key: str,
    *,
    group: str,
    callbacks: Sequence[Callback],
    output_dir: str | os.PathLike[str] = "runs",
    consumer: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    claim_after: float = 30.0,
    drain_timeout: float = 60.0,
    count: int = 512,
) -> ConsumeResult:
    """Run ``callbacks`` on the events of the run ``run_key`` until it ends.

    Files go to a new run dir under ``output_dir`` (or, for a restarted
    consumer, the one it used before). Blocks until every rank of the run
    has ended (see :class:`RanksEnded`), or until cancelled: either way each
    callback's ``teardown`` runs and its files are complete. ``count`` is how
    many entries are read (and acknowledged) at a time. Raises ``ValueError``
    for a run key that escapes ``output_dir`` and
    :class:`~evsys_async.transports.RedisUnavailableError` if Redis does not answer.
    """
    source = RedisStreamSource(
        url,
        run_key,
        group=group,
        consumer=consumer,
        rank=rank,
        claim_after=claim_after,
        drain_timeout=drain_timeout,
        count=count,
    )
    try:
        resume = await in_daemon_thread(source.prepare)
        root = Path(output_dir)
        run_dir, same = await in_daemon_thread(
            _consumer_dir, source, run_key, root, resume is not None
        )
        await in_daemon_thread(source.record_dir, str(run_dir))
        start_step = resume.start_step if resume is not None else 0
        if resume is not None:
            _log.info(
                "consumer resumes",
                group=group,
                consumer=source.consumer,
                start_step=start_step,
                run_dir=str(run_dir),
                same_dir=same,
            )
        state = LoopState(
            output_dir=run_dir.parent,
            ctx=LogContext(output_dir=run_dir.parent, run_key=run_dir.name),
            start_step=start_step,
            step=start_step,
        )
        result = ConsumeResult(
            run_dir=run_dir, resumed_at=start_step if resume is not None else None, published=0
        )
        until = RanksEnded(world_size, rank)

        def follow(envelope: Envelope) -> None:
            event = envelope.event
            if isinstance(event, TrainStarted | StepEnded):
                state.num_steps = event.num_steps
            if isinstance(event, StepEnded):
                state.step = event.step

        adapters = [CallbackAdapter(cb, state) for cb in callbacks]
        async with EventBus(close_timeout=drain_timeout) as bus:
            subs = [a.subscribe(bus) for a in adapters]
            try:
                result.published = await source.forward(bus, until=until, on_envelope=follow)
            finally:
                await shielded(_close(bus, adapters, subs, result, drain_timeout))
        result.ended = dict(until.ended)
        result.source = source.stats()
        return result
    finally:
        source.close()


async def _close(
    bus: EventBus,
    adapters: list[CallbackAdapter],
    subs: list[Subscription],
    result: ConsumeResult,
    timeout: float,
) -> None:
    await bus.drain(timeout)
    closed = [True] * len(subs)

    async def close(i: int, sub: Subscription) -> None:
        closed[i] = await sub.aclose(timeout)

    async with anyio.create_task_group() as tg:
        for i, sub in enumerate(subs):
            tg.start_soon(close, i, sub)
    result.callback_report = {
        a.name: _health(a, s, ok) for a, s, ok in zip(adapters, subs, closed, strict=True)
    }


# -- tail ------------------------------------------------------------------------------


@dataclass
class TailResult:
    """Each rank's ``TrainEnded`` and how many events were shown."""

    ended: dict[int, TrainEnded]
    events: int


class _Printer:
    """The progress line's output for one rank, and one line per rank's end."""

    def __init__(self, out: TextIO, every: int, rank: int) -> None:
        self.out = out
        self.every = every
        self.rank = rank
        self.world_size = 1
        self.num_steps = 0
        self.printed_first = False
        self.unprinted: StepEnded | None = None

    def _line(self, text: str) -> None:
        self.out.write(text.rstrip() + "\n")
        self.out.flush()

    def _step(self, event: StepEnded) -> str:
        cells = " ".join(f"{k}={fmt_value(v)}" for k, v in event.metrics.items())
        return f"[{event.step + 1}/{event.num_steps}] {cells}"

    async def __call__(self, event: Event) -> None:
        if isinstance(event, TrainStarted):
            self.world_size = max(self.world_size, event.world_size)
            if event.rank == self.rank:
                self.num_steps = event.num_steps
        elif isinstance(event, StepEnded) and event.rank == self.rank:
            self.num_steps = event.num_steps
            last = event.step + 1 == event.num_steps
            if self.printed_first and not due(event.step, self.every) and not last:
                self.unprinted = event
                return
            self.printed_first, self.unprinted = True, None
            self._line(self._step(event))
        elif isinstance(event, EvalEnded) and event.rank == self.rank:
            cells = " ".join(f"{k}={fmt_value(v)}" for k, v in event.metrics.items())
            self._line(f"[{event.step + 1}/{self.num_steps}] eval {event.eval_name}: {cells}")
        elif isinstance(event, TrainEnded):
            if event.rank == self.rank and self.unprinted is not None:
                self._line(self._step(self.unprinted))
                self.unprinted = None
            self._line(self.end_line(event))

    def end_line(self, event: TrainEnded) -> str:
        who = f"rank {event.rank}: " if self.world_size > 1 else ""
        text = f"{who}{event.status} after {event.steps_completed} of {event.num_steps} steps"
        if event.stop_reason:
            text += f": {event.stop_reason}"
        if event.stop_rank is not None and self.world_size > 1:
            text += f" (requested by rank {event.stop_rank})"
        if event.error:
            text += f" — error: {event.error}"
        return text


async def tail(
    url: str,
    run_key: str,
    *,
    out: TextIO | None = None,
    every: int = 1,
    rank: int = 0,
    world_size: int | None = None,
    start: str = "0",
    err: TextIO | None = None,
) -> TailResult:
    """Print the run ``run_key`` as its progress line does, from its start (``start="$"``:
    from now on), until every rank has ended; returns each rank's ``TrainEnded``.

    When the run has no stream yet, one line on ``err`` (default stderr) says it is
    waiting for the run; the lines follow once it starts. Raises
    :class:`~evsys_async.transports.RedisUnavailableError` if Redis does not
    answer at the start (later outages are waited out, with one WARNING each)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    printer = _Printer(out if out is not None else sys.stdout, every, rank)
    source = RedisStreamSource(url, run_key, start=start)
    until = RanksEnded(world_size)
    try:
        await in_daemon_thread(source.prepare)  # Redis away: one clear error
        if not await in_daemon_thread(source.stream_exists):
            print(
                f"evsys-async tail: waiting for run {run_key!r}: no stream {source.stream} "
                f"on {redact_url(url)} yet (it appears when the run starts)",
                file=err if err is not None else sys.stderr,
                flush=True,
            )
        async with EventBus() as bus:
            bus.subscribe(printer, name="evsys-tail")
            count = await source.forward(bus, until=until)
            await bus.drain(30.0)
    finally:
        source.close()
    return TailResult(ended=dict(until.ended), events=count)
