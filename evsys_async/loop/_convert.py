"""The converter: a run's device metrics become floats off the training thread.

A step that returns a value on a device (a CUDA tensor) must not wait for that
device: ``float()`` there would wait for every kernel queued before it, once a
step. ``_metrics.py`` copies such a value on its device (that does not block)
and hands the step's metrics over as a :class:`~._metrics.Pending`;
:class:`Converter` converts them here, in **one daemon thread**
(``evsys-convert:<run_key>``, started at the first such value: a run whose
metrics are all on the CPU never has one), in step order, and publishes each
step's ``StepEnded`` once its floats are known (docs/design.md, "A run").

Order. Each step's ``StepEnded`` is published once, in step order:

* while the converter has work queued, every later step queues behind it
  (:attr:`Converter.pending`), device values or not;
* a boundary with work (an eval or checkpoint due, a request, a steering
  callback) waits for the conversions first (:meth:`Converter.converted`), so
  the events of a step (``EvalEnded``, ``CheckpointSaved``, ``StopRequested``)
  follow its ``StepEnded``; with a ``controls_loop`` callback on ``StepEnded``
  every boundary has work, so every step with device values waits for its
  conversion there: the cost of deciding a stop at every step;
* the shutdown waits for the queue (``StepThread.wait_idle``) before the last
  checkpoint and ``TrainEnded``.

Who publishes. For a ``def`` step the converter publishes from its thread (the
step thread publishes from a thread too). For an ``async def`` step the loop
publishes the converted steps as it passes (:meth:`Converter.take_ready`, at
each step): a publish from another thread wakes the loop and the bus's pump,
once a step, which costs a fast step a few percent; when the loop has not
come by within ``grace`` (a long step), the converter publishes them itself.

Cancellation. A step that ran is published even when the wait for its
conversion is cancelled: the converter then publishes it itself.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import anyio

from .._util.aio import LoopWaker
from .._util.log import get_logger
from ..events import Event
from ..events._frozen import FrozenDict
from ._metrics import Pending, resolve

__all__ = ["Converter", "StepEndedOf"]

_log = get_logger()

#: ``make(step_idx, metrics)``: the run's ``StepEnded`` for a step
StepEndedOf = Callable[[int, dict[str, float]], Event]
Metrics = dict[str, float] | Pending


class _Handback:
    """A conversion the loop awaits (:meth:`Converter.converted`). If the waiting task
    is cancelled first, the converter publishes the step's ``StepEnded`` itself."""

    __slots__ = ("abandoned", "done", "event", "lock", "metrics", "step_idx", "value", "waker")

    def __init__(self, metrics: Metrics | None, step_idx: int | None) -> None:
        self.metrics = metrics
        self.step_idx = step_idx
        self.value: dict[str, float] | None = None
        self.done = False
        self.abandoned = False
        self.lock = threading.Lock()
        self.event = anyio.Event()  # made on the loop, by the task that awaits it
        self.waker = LoopWaker()

    def abandon(self) -> bool:
        """The waiter is gone: ``True`` if the converter will publish the step, ``False``
        if it already handed the value back (the waiter publishes it)."""
        with self.lock:
            self.abandoned = not self.done
            return self.abandoned


class _Built:
    """Any event built from metrics once they are floats (:meth:`Converter.publish_built`):
    an eval's or a checkpoint's, kept in order behind the steps before it."""

    __slots__ = ("build", "metrics")

    def __init__(self, metrics: Metrics, build: Callable[[dict[str, float]], Event]) -> None:
        self.metrics, self.build = metrics, build


#: ``(metrics, step_idx, on_loop)``: a step to publish; an event built from metrics; or
#: a conversion the loop awaits
_Job = tuple[Metrics, int, bool] | _Built | _Handback
_Jobs = queue.SimpleQueue[_Job | None]
#: the loop has not come by for the converted steps within grace
_FLUSH: Any = object()


class Converter:
    """The converter of one run (see the module docstring). ``publish`` is the bus's
    (safe from any thread), ``make`` builds a step's ``StepEnded``; ``grace`` is how
    long a converted step waits for the loop to publish it (:meth:`take_ready`)
    before the converter publishes it itself."""

    def __init__(
        self,
        name: str,
        publish: Callable[[Event], object],
        make: StepEndedOf,
        *,
        grace: float = 0.02,
    ) -> None:
        self.name = name
        self._publish = publish
        self._make = make
        self._grace = grace
        self._queue: _Jobs = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        #: converted ``StepEnded`` events the loop publishes at its next step (cheaper
        #: than a wake of the loop from this thread per step), in step order
        self._ready: list[Event] = []
        #: conversions queued and not yet published or handed back (read without the
        #: lock from any thread: 0 means every step queued so far has been published)
        self.pending = 0

    def publish_later(self, step_idx: int, metrics: Metrics, *, on_loop: bool = False) -> None:
        """Queue ``step_idx``'s ``StepEnded``, published once its floats are known, after
        every step queued before it. ``on_loop`` (the caller is the event loop, which
        calls :meth:`take_ready` at each step): the loop publishes it, or this thread
        if the loop has not come by within ``grace``. Never blocks."""
        self._put((metrics, step_idx, on_loop))

    def publish_step(self, step_idx: int, metrics: Metrics) -> None:
        """Publish ``step_idx``'s ``StepEnded`` now, or queued behind the conversions in
        progress (any thread). Never blocks."""
        if self.pending or isinstance(metrics, Pending):
            self._put((metrics, step_idx, False))
        else:
            self._publish(self._make(step_idx, metrics))

    def publish_built(self, metrics: Metrics, build: Callable[[dict[str, float]], Event]) -> None:
        """Publish ``build(floats)`` now, or queued behind the conversions in progress,
        so it never overtakes a step published before it (any thread; the session's
        evals and checkpoints). Never blocks."""
        if self.pending or isinstance(metrics, Pending):
            self._put(_Built(metrics, build))
        else:
            self._publish(build(metrics))

    def take_ready(self) -> None:
        """Publish the converted steps waiting for the loop, in order (on the loop)."""
        if self._ready:
            with self._lock:
                self._flush_ready()

    async def converted(self, metrics: Metrics, step_idx: int | None = None) -> dict[str, float]:
        """``metrics`` as floats, once every conversion queued before them is done and
        published (on the loop). Cancelled, the step ``step_idx`` (if given) is still
        published."""
        job = _Handback(metrics, step_idx)
        self._put(job)
        try:
            await job.event.wait()
        except BaseException:  # cancelled: the step ran, so its event goes out anyway
            if not job.abandon():
                self.take_ready()
                if step_idx is not None and job.value is not None:
                    self._publish(self._make(step_idx, job.value))
            raise
        self.take_ready()
        assert job.value is not None
        return job.value

    async def idle(self) -> None:
        """Wait until every conversion queued so far is done and published (on the loop).
        Cancellable: the conversions go on."""
        if not self.pending:
            return
        await self.converted(FrozenDict())

    def close(self) -> None:
        """The thread ends after what is queued (a conversion queued later starts
        another). Never blocks."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread, self._queue = None, queue.SimpleQueue()

    def _put(self, job: _Job) -> None:
        with self._lock:
            self.pending += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, args=(self._queue,), name=self.name, daemon=True
                )
                self._thread.start()
            self._queue.put(job)

    def _serve(self, jobs: _Jobs) -> None:
        while True:
            try:  # converted steps wait for the loop, but not longer than grace
                job = jobs.get(timeout=self._grace) if self._ready else jobs.get()
            except queue.Empty:
                job = _FLUSH
            if job is None or job is _FLUSH:
                with self._lock:
                    self._flush_ready()
                if job is None:
                    return
                continue
            try:
                self._run(job)
            except Exception:  # pragma: no cover - a bug: said, and the next step goes on
                _log.exception("converter failed on a step's metrics", converter=self.name)

    def _run(self, job: _Job) -> None:
        if isinstance(job, _Built):
            built = job.build(resolve(job.metrics))
            with self._lock:
                self._flush_ready()
                self._publish(built)
                self.pending -= 1
            return
        if not isinstance(job, _Handback):
            metrics, step_idx, on_loop = job
            event = self._make(step_idx, resolve(metrics))
            with self._lock:
                if on_loop:
                    self._ready.append(event)
                else:
                    self._flush_ready()
                    self._publish(event)
                    self.pending -= 1
            return
        value = None if job.metrics is None else resolve(job.metrics)
        with job.lock:
            if not job.abandoned:
                job.value, job.done = FrozenDict() if value is None else value, True
                job.waker.soon(job.event.set)
        with self._lock:
            self.pending -= 1
            if job.abandoned:  # its waiter was cancelled: publish what it would have
                self._flush_ready()
                if job.step_idx is not None and value is not None:
                    self._publish(self._make(job.step_idx, value))

    def _flush_ready(self) -> None:
        """Publish the converted steps waiting (under the lock, so in order)."""
        for event in self._ready:
            self._publish(event)
        self.pending -= len(self._ready)
        self._ready.clear()
