"""CallbackAdapter: subscribes one callback to a bus as one subscriber, for one run.

What runs the hooks is the :class:`~._runner.HookRunner` it extends; the
adapter adds where it runs: in this process (the runner's handler and
lifecycle hooks, in the callback's thread or task), or, for
``isolation = "process"``, in a child process of its own through
:class:`~._remote.RemoteCallback` (what crosses), whose requests come back as
bytes to :meth:`CallbackAdapter.apply_request`. The loop, replay and consume
own one adapter per callback per run; the bus sees only handlers and hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ..bus import EventBus, Isolation, Subscription
from ..bus._subscribe import SubscribeOptions
from ..state import Degraded, LoopState
from ._remote import RemoteCallback, call_remote
from ._requests import Health, apply, decode_request
from ._runner import HookRunner
from .base import Callback

__all__ = ["CallbackAdapter"]


class CallbackAdapter(HookRunner):
    """Subscribes one callback to a bus as one subscriber, for one run's state.

    The loop owns one adapter per callback per run. ``offer_batch`` hands the
    live batch out of band to ``wants_batch`` callbacks (only the newest is
    held: an older step's ``on_step_end`` gets ``None``). Made on any thread;
    raises as :class:`~._runner.HookRunner` does for a hook that cannot be.
    """

    def __init__(self, callback: Callback, state: LoopState) -> None:
        super().__init__(callback, state)
        self.subscription: Subscription | None = None
        #: control barriers that timed out waiting for this callback (the loop counts)
        self.control_timeouts = 0
        #: the last health the callback's own process reported (isolation="process")
        self._remote_health: Health | None = None

    @property
    def degraded(self) -> Degraded | None:
        """Why the callback's output is incomplete (``Callback.degraded``), else None.

        For a callback in this process, its own attribute as it stands; for one in
        its own process, the value the child last reported (after ``setup``, each
        ``flush`` and ``teardown``: current once the callback has closed). What
        the report's ``CallbackHealth.degraded`` is made of."""
        if self.isolation == "process":
            health = self._remote_health
            return None if health is None else health.degraded
        value = getattr(self.callback, "degraded", None)
        return value if isinstance(value, Degraded) else None

    @property
    def disabled_reason(self) -> str | None:
        """Why the callback switched itself off for the run (its ``disabled_reason``,
        e.g. a logger whose service refused it), else None; for a callback in its
        own process, as the child last reported it (see :attr:`degraded`)."""
        if self.isolation == "process":
            health = self._remote_health
            return None if health is None else health.disabled_reason
        value = getattr(self.callback, "disabled_reason", None)
        return str(value) if value else None

    def subscribe(
        self,
        bus: EventBus,
        *,
        run_key: str | None = None,
        on_interrupt: Callable[[BaseException], None] | None = None,
    ) -> Subscription:
        """Subscribe the callback; ``setup``/``teardown``/``flush`` run in its thread or task
        (or, with ``isolation = "process"``, in its own process). On the bus's loop.

        ``on_interrupt`` gets a ``KeyboardInterrupt``/``SystemExit`` that one of its
        ``async def`` hooks raised (the run ends as cancelled), instead of the bus
        cancelling its block.

        A callback whose ``setup`` raises is disabled for the run (its event hooks
        never run on a half-built object; its events count as dropped, the reason
        in ``SubscriberStats.disabled``) unless its class sets
        ``runs_without_setup = True``; ``max_consecutive_failures`` switches it off
        after that many failed events in a row. Raises ``TypeError`` for a
        process callback that cannot be pickled or whose class its process cannot
        import (defined in ``__main__`` of a notebook or ``python -c``), and what
        :meth:`EventBus.subscribe` raises."""
        on_request: Callable[[bytes], None] | None = None
        isolation: Isolation | None = None  # a task or a thread: ``sync`` says which
        if self.isolation == "process":
            hooks = RemoteCallback(self).hooks()
            isolation = "process"
            on_request = self.apply_request
        else:
            hooks = self.bind()
        options = SubscribeOptions(
            events=self.event_types,
            policy=self.policy,
            name=self.name,
            timeout=self.timeout,
            envelopes=self._wants_envelope,
            run_key=run_key,
            isolation=isolation,
            # the handler is a plain function that returns the hook's coroutine for an
            # async callback (no wrapper coroutine per event): say how to call it
            sync=not self.is_async,
            on_start=hooks.on_start,
            on_batch_end=hooks.on_batch_end,
            on_close=hooks.on_close,
            hook_name=self.label,
            on_request=on_request,
            on_interrupt=on_interrupt,
            requires_start=not getattr(self.callback, "runs_without_setup", False),
            max_consecutive_failures=getattr(self.callback, "max_consecutive_failures", None),
        )
        self.subscription = bus.subscribe_with(hooks.handler, options)
        self.name = self.subscription.name
        return self.subscription

    def state_call(self, method: str, *args: Any) -> Callable[[], Any]:
        """``callback.<method>(*args)`` as a function to hand to ``Subscription.call``: it
        reaches the callback where it lives (in its own process, the copy there)."""
        if self.isolation == "process":
            return functools.partial(call_remote, method, *args)
        return functools.partial(getattr(self.callback, method), *args)

    def apply_request(self, data: bytes) -> None:
        """What the callback's process asked of the run, or told of its health (in the
        subscriber's feeder thread, before the batch in hand counts as done). Raises
        ``ValueError`` for a request it does not know (the bus logs it as a WARNING)."""
        request = decode_request(data, callback=self.name)
        if isinstance(request, Health):
            self._remote_health = request
        else:
            apply(self.state, request)
