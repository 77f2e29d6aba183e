"""The control barrier: after an event that steering callbacks handle, wait for them.

A callback *steers* when it has ``controls_loop`` (it may stop the run from
its hook), or, with ``callback_errors="raise"``, always (its failure ends the
run). After each of the loop's events such a callback handles, the loop waits
until it has handled that event, up to ``control_timeout``; so a stop asked on
step k's ``StepEnded`` is honoured before step k+1 (docs/design.md, "A run"
and "Guarantees, and the module that keeps each"). Callbacks that do not
steer never slow the loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from .._util.log import get_logger
from ..bus import Subscription
from ..callbacks._adapter import CallbackAdapter
from ..events import Event

__all__ = ["ControlBarrier"]

_log = get_logger()

_Watched = list[tuple[CallbackAdapter, Subscription]]


class ControlBarrier:
    """After an event that steering callbacks handle, wait for them to handle it.

    Steering: ``controls_loop`` callbacks, or every callback with
    ``callback_errors="raise"`` (``every_callback``). Up to ``control_timeout``
    per event; past it a WARNING, a count in the callback's report, and the
    loop goes on. Callbacks that do not steer never slow the loop.
    """

    def __init__(self, *, control_timeout: float, every_callback: bool) -> None:
        self.control_timeout = control_timeout
        self.every_callback = every_callback
        #: with every_callback: the first failure seen (the run ends with it)
        self.callback_error: BaseException | None = None
        self._watched: _Watched = []
        self._by_type: dict[type[Event], _Watched] = {}
        self._failures_seen: dict[str, int] = {}

    def watch(self, adapters: Sequence[CallbackAdapter], subs: Sequence[Subscription]) -> None:
        """Watch the steering ones of these callbacks (one subscription each, in order)."""
        self._watched = [
            (a, s)
            for a, s in zip(adapters, subs, strict=True)
            if self.every_callback or a.controls_loop
        ]
        self._by_type.clear()

    def applies(self, event_type: type[Event]) -> bool:
        """Some steering callback handles this event type (fixed for the run)."""
        return bool(self._steering(event_type))

    def _steering(self, event_type: type[Event]) -> _Watched:
        found = self._by_type.get(event_type)
        if found is None:
            found = self._by_type[event_type] = [
                (a, s) for a, s in self._watched if a.handles(event_type)
            ]
        return found

    async def wait(self, seq: int | None, event_type: type[Event]) -> None:
        """Wait for the steering callbacks that handle ``event_type`` to handle ``seq``.

        Returns at once when none does (or ``seq`` is ``None``: not published on the
        loop thread). Never raises for a callback: a timeout is logged and counted;
        a failure (with ``every_callback``) is kept in :attr:`callback_error`.
        """
        steering = self._steering(event_type)
        if seq is None or not steering:
            return
        deadline = time.monotonic() + self.control_timeout
        for adapter, sub in steering:
            if not await sub.wait(seq, max(0.0, deadline - time.monotonic())):
                adapter.control_timeouts += 1
                _log.warning(
                    "control callback did not keep up; the loop goes on",
                    callback=adapter.name,
                    event_type=event_type.__name__,
                    control_timeout=self.control_timeout,
                )
            if self.every_callback:
                st = sub.stats()
                failures = st.failed + st.hook_failures
                if failures > self._failures_seen.get(sub.name, 0) and self.callback_error is None:
                    self.callback_error = sub.last_error
                self._failures_seen[sub.name] = failures
