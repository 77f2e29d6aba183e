"""StepThread: where a run's ``def`` step and ``def`` checkpoint function run, and
the converter that turns its device metrics into floats.

One daemon thread for every step of the run, started with the caller's
contextvars and the caller's framework context (``_context.py``: torch's
grad mode, inference mode, default device and autocast, and the loop's
``step_context``), so thread-local framework state is the caller's and stays
put from step to step; under ``run_sync()`` the caller's own thread, which
the run borrows and does not end (docs/design.md, "Threads and tasks"). A run
with an ``async def`` step has none until it needs one: a ``def`` checkpoint
function or a coordinator call then makes it. It ends after the shutdown's
last call into it. The converter (``_convert.py``) is made when the steps
start and has a thread only once a metric is on a device.
"""

from __future__ import annotations

from collections.abc import Callable

from .._util.worker import DaemonWorker
from ..events import Event
from ._context import ThreadContext
from ._convert import Converter, StepEndedOf

__all__ = ["StepThread"]


class StepThread:
    """The step thread of one run (see the module docstring). Loop thread only."""

    def __init__(
        self,
        name: str,
        worker: DaemonWorker | None,
        *,
        owned: bool,
        context: ThreadContext | None = None,
    ) -> None:
        self.name = name
        #: where ``def`` steps run; ``None`` until a call needs one (an ``async def`` step)
        self.worker = worker
        self._owned = owned
        #: the shutdown gave up on a call that never returned (a hung ``def`` step):
        #: it runs on in its thread, and its result is dropped
        self.abandoned = False
        self._context = context or ThreadContext()
        #: the run's converter, once the steps have started (:meth:`converter_for`)
        self.converter: Converter | None = None

    @classmethod
    def for_run(
        cls,
        name: str,
        caller: DaemonWorker | None,
        *,
        def_step: bool,
        context: ThreadContext | None = None,
    ) -> StepThread:
        """The caller's thread (``run_sync()``), else a daemon of the run's own, started
        now with the caller's contextvars and ``context`` for a ``def`` step, later for
        an ``async`` one."""
        if caller is not None:
            return cls(name, caller, owned=False, context=context)
        thread = cls(name, None, owned=True, context=context)
        if def_step:
            thread.for_calls()
        return thread

    def for_calls(self) -> DaemonWorker:
        """Where a ``def`` checkpoint function or a coordinator call runs: the step
        thread, made now if the step is ``async def``."""
        if self.worker is None:
            self.worker = DaemonWorker(self.name, enter=self._context.entered)
            self._owned = True
        return self.worker

    def converter_for(self, publish: Callable[[Event], object], make: StepEndedOf) -> Converter:
        """The run's converter (made on the first call): ``publish`` is the bus's,
        ``make`` builds a step's ``StepEnded``."""
        if self.converter is None:
            key = self.name.removeprefix("evsys-step:")
            self.converter = Converter(f"evsys-convert:{key}", publish, make)
        return self.converter

    async def wait_idle(self) -> None:
        """Wait until the call in progress (a ``def`` step cannot be cancelled) has
        returned and every step's metrics are converted and published.

        Cancellable: the call and the conversions go on in their threads.
        """
        if self.worker is not None:
            await self.worker.wait_idle()
        if self.converter is not None:
            await self.converter.idle()

    @property
    def busy(self) -> bool:
        """A call (a ``def`` step, a checkpoint function) is in progress."""
        return self.worker is not None and self.worker.busy

    def abandon(self) -> None:
        """Give up on the call in progress (loop thread): it runs on in its thread,
        which ends after it; a later call gets a thread of its own. Never blocks."""
        self.abandoned = True
        self.close()
        self.worker, self._owned = None, True

    def close(self) -> None:
        """The run is done with its step thread: it ends after the calls already
        submitted. A caller's thread is the caller's: left as it is. Never blocks."""
        if self.worker is not None and self._owned:
            self.worker.close()
        if self.converter is not None:
            self.converter.close()
