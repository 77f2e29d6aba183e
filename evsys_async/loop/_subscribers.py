"""LoopSubscription: a subscriber of a loop's runs, whatever run key each claims.

``TrainingLoop.subscribe(handler, ...)`` (and ``TrainingLoop(subscribers=...)``)
take the options of :meth:`EventBus.subscribe` but the run key: each run of the
loop subscribes the handler on its own bus, filtered by the key it claimed,
before its first event, and ends the subscription in its shutdown after the
drain, so the handler sees exactly that run, ``TrainStarted`` to
``TrainEnded`` (docs/design.md, "A run"). A subscription made while a run is in
progress joins it at once; one made after its ``TrainEnded`` joins the next.
:meth:`LoopSubscription.close` (any thread) leaves the loop's runs.

**Where an ``async def`` handler runs.** As with ``EventBus.subscribe``: as a
task on the run's event loop. With ``run(own_thread=True)`` the run's event
loop is not the caller's, so a handler subscribed from an event loop (by
``subscribe``, or by ``subscribers=`` when the loop was built there) runs *on
that loop* instead: the run's bus delivers to a thread of the subscriber's own,
which hands each event to the subscriber's loop (``anyio.from_thread.run`` with
its token) and waits for the handler there. A busy or blocked subscriber loop
then delays only this subscriber, never the run (docs/guide.md, "A run on an
event loop of its own").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import anyio.from_thread
import anyio.lowlevel

from .._util.aio import is_async_callable
from ..bus import EventBus, SubscriberStats, Subscription
from ..bus._subscribe import SubscribeOptions, default_name, plan

__all__ = ["LoopSubscription", "home_token"]


def home_token() -> anyio.lowlevel.EventLoopToken | None:
    """The event loop running in this thread, if any (where an ``async def`` handler
    of an own-thread run is called)."""
    try:
        return anyio.lowlevel.current_token()
    except Exception:  # no event loop here (a plain thread): anyio names it differently
        return None


class LoopSubscription:
    """One subscriber of a loop's runs (see the module docstring).

    Made by ``TrainingLoop.subscribe``, which checks the handler and options as
    ``EventBus.subscribe`` does (``TypeError``/``ValueError`` there, not at the
    run's start). ``subscription`` is the bus subscription of the run in
    progress (or of the latest run), ``None`` before the first; ``run_key`` is
    that run's key.
    """

    def __init__(
        self,
        handler: Callable[[Any], Any],
        options: SubscribeOptions,
        *,
        home: anyio.lowlevel.EventLoopToken | None,
        close: Callable[[LoopSubscription], None],
    ) -> None:
        planned = plan(handler, options)  # the checks, now, where the caller can see them
        self.handler = handler
        self.options = options
        #: the handler is awaited on an event loop (not in a thread or a process)
        self._on_a_loop = planned.isolation == "task"
        #: the event loop that subscribed: an own-thread run calls async handlers there
        self.home = home
        self._asked = options.name or default_name(handler)
        #: the name asked for; once subscribed, the run's bus's unique name
        self.name = self._asked
        self.subscription: Subscription | None = None
        self.run_key: str | None = None
        self.closed = False
        self._close = close

    def __repr__(self) -> str:
        return f"<LoopSubscription {self.name!r} run_key={self.run_key!r}>"

    def stats(self) -> SubscriberStats | None:
        """The counts of its subscription to the run in progress (or the latest run),
        ``None`` before the first. Exact on the run's event loop; elsewhere a snapshot."""
        sub = self.subscription
        return None if sub is None else sub.stats()

    def close(self) -> None:
        """Leave the loop's runs: the run in progress ends this subscription soon (an
        event published after that does not reach it; what was published before is
        still handled, then ``on_close`` runs) and no later run subscribes it. Any
        thread; never blocks; a second call does nothing."""
        if not self.closed:
            self.closed = True
            self._close(self)

    # -- the run's side ------------------------------------------------------------------

    def subscribe(self, bus: EventBus, run_key: str | None, *, own_thread: bool) -> Subscription:
        """Subscribe on ``bus`` for the run ``run_key`` (on the bus's event loop).
        ``own_thread``: the run has an event loop of its own, so an ``async def``
        handler made on another loop is called there (the module docstring)."""
        handler: Callable[[Any], Any] = self.handler
        options = replace(self.options, run_key=run_key, name=self._asked)
        home = self.home
        if own_thread and home is not None and not _is_current(home):
            handler, options = _bridged(handler, options, home, self._on_a_loop)
        sub = bus.subscribe_with(handler, options)
        self.subscription, self.name, self.run_key = sub, sub.name, run_key
        return sub


def _is_current(token: anyio.lowlevel.EventLoopToken) -> bool:
    here = home_token()
    return here is not None and here.native_token is token.native_token


def _bridged(
    handler: Callable[[Any], Any],
    options: SubscribeOptions,
    home: anyio.lowlevel.EventLoopToken,
    on_a_loop: bool,
) -> tuple[Callable[[Any], Any], SubscribeOptions]:
    """``handler`` and its ``async def`` hooks called on ``home`` from a thread of the
    subscriber's own (a failure there is the subscriber's, as any handler's)."""
    if options.isolation == "process":  # it runs in its own process, on its own loop
        return handler, options

    def on_home(fn: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: anyio.from_thread.run(fn, *args, token=home)

    def bridged(hook: Callable[[], Any] | None) -> Callable[[], Any] | None:
        return on_home(hook) if hook is not None and is_async_callable(hook) else hook

    hooks = (options.on_start, options.on_batch_end, options.on_close)
    if not (on_a_loop or any(h is not None and is_async_callable(h) for h in hooks)):
        return handler, options
    return on_home(handler) if on_a_loop else handler, replace(
        options,
        isolation="thread",
        sync=None,
        on_start=bridged(options.on_start),
        on_batch_end=bridged(options.on_batch_end),
        on_close=bridged(options.on_close),
    )
