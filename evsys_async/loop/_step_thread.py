"""StepThread: where a run's ``def`` step and ``def`` checkpoint function run.

One daemon thread for every step of the run, started with the caller's
contextvars, so thread-local framework state stays put from step to step;
under ``run_sync()`` the caller's own thread, which the run borrows and does
not end (docs/design.md, "Threads and tasks"). A run with an ``async def``
step has none until it needs one: a ``def`` checkpoint function or a
coordinator call then makes it. It ends after the shutdown's last call into it.
"""

from __future__ import annotations

from .._util.worker import DaemonWorker

__all__ = ["StepThread"]


class StepThread:
    """The step thread of one run (see the module docstring). Loop thread only."""

    def __init__(self, name: str, worker: DaemonWorker | None, *, owned: bool) -> None:
        self.name = name
        #: where ``def`` steps run; ``None`` until a call needs one (an ``async def`` step)
        self.worker = worker
        self._owned = owned
        #: the shutdown gave up on a call that never returned (a hung ``def`` step):
        #: it runs on in its thread, and its result is dropped
        self.abandoned = False

    @classmethod
    def for_run(cls, name: str, caller: DaemonWorker | None, *, def_step: bool) -> StepThread:
        """The caller's thread (``run_sync()``), else a daemon of the run's own, started
        now with the caller's contextvars for a ``def`` step, later for an ``async`` one."""
        if caller is not None:
            return cls(name, caller, owned=False)
        return cls(name, DaemonWorker(name) if def_step else None, owned=True)

    def for_calls(self) -> DaemonWorker:
        """Where a ``def`` checkpoint function or a coordinator call runs: the step
        thread, made now if the step is ``async def``."""
        if self.worker is None:
            self.worker = DaemonWorker(self.name)
            self._owned = True
        return self.worker

    async def wait_idle(self) -> None:
        """Wait until the call in progress (a ``def`` step cannot be cancelled) returns.

        Cancellable: the call goes on in its thread.
        """
        if self.worker is not None:
            await self.worker.wait_idle()

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
