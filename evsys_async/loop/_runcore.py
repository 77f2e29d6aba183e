"""RunCore: what a loop run and a session's run hold alike.

A :class:`~._run.Run` (the loop's) and a
:class:`~evsys_async.session._run.SessionRun` (a trainer's that is not ours)
pass through the same phases — the step boundary, the control barrier, evals,
checkpoints, the shutdown — which see a run only through ``Protocol``\\ s. This
base holds what those protocols read and both runs make the same way, and
stamps the run's events with its run key and rank. Loop thread only.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..bus import EventBus, Subscription
from ..callbacks._adapter import CallbackAdapter
from ..events import Event
from ..state import LoopArtifacts, LoopState
from ._barrier import ControlBarrier
from ._checkpoints import Checkpoints
from ._evals import Evals
from ._settings import RunSettings
from ._step_thread import StepThread

__all__ = ["RunCore"]


class RunCore:
    """What the phases share of one run (see the module docstring)."""

    def __init__(
        self,
        settings: RunSettings,
        state: LoopState,
        artifacts: LoopArtifacts,
        adapters: list[CallbackAdapter],
        bus: EventBus,
        *,
        owns_bus: bool,
        step_thread: StepThread,
    ) -> None:
        self.settings = settings
        self.state = state
        self.artifacts = artifacts
        self.adapters = adapters
        #: the adapters of ``wants_batch`` callbacks: a step's batch goes to these
        self.batch_takers = [a for a in adapters if getattr(a.callback, "wants_batch", False)]
        self.bus = bus
        #: the run made ``bus``: the shutdown drains all of it and bounds its close
        self.owns_bus = owns_bus
        self.run_key = settings.run_key
        #: one per adapter, in order, once started
        self.subs: list[Subscription] = []
        #: where ``def`` steps, a ``def`` checkpoint function and the coordinator run
        self.step_thread = step_thread
        self.barrier = ControlBarrier(
            control_timeout=settings.control_timeout,
            every_callback=settings.callback_errors == "raise",
        )
        self.evals = Evals(self, settings)
        self.checkpoints = Checkpoints(self, settings)
        #: KeyboardInterrupt/SystemExit from one of the run's ``async def`` hooks
        self.interrupted: BaseException | None = None
        #: the rank whose stop request (or failure) ended the run, once the ranks agreed
        self.stop_rank: int | None = None

    def make(self, cls: type[Event], **fields: Any) -> Event:
        """One of the run's own events, built with its run key and rank."""
        return cls(run_key=self.run_key, rank=self.state.rank, **fields)

    def emit(self, cls: type[Event], **fields: Any) -> int | None:
        """Publish one of the run's own events, built with its run key and rank (no copy)."""
        return self.bus.publish(cls(run_key=self.run_key, rank=self.state.rank, **fields))

    def publish(self, event: Event) -> int | None:
        """``state.publish``: a user's or a callback's event, stamped with the run key
        and rank (a copy where either differs: events are frozen)."""
        key, rank = self.run_key, self.state.rank
        if (key and not event.run_key) or event.rank != rank:
            event = msgspec.structs.replace(event, run_key=event.run_key or key, rank=rank)
        return self.bus.publish(event)
