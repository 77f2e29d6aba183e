"""What ``EventBus.subscribe`` decides once, before a subscriber exists: its options,
checked; where its handler runs; the delivery that runs it.

:class:`SubscribeOptions` is a subscriber's make-up beside its handler: every
argument :meth:`~evsys_async.bus.EventBus.subscribe` takes, plus
``on_interrupt``, which only the package's own callers give (the loop, through
the callback adapter) through :meth:`~evsys_async.bus.EventBus.subscribe_with`.
:func:`plan` checks them and decides, once, where the handler runs;
:meth:`Plan.build` makes the delivery.

Where a handler runs is one choice, ``isolation``: ``"task"`` (on the event
loop: the handler is awaited), ``"thread"`` (its own daemon thread),
``"process"`` (a child process of its own, where it runs in a thread or on an
event loop, by the same rule), or ``None``: by the handler, a task for
``async def`` and a thread for ``def``. ``sync`` is the older spelling of the
same choice — ``sync=True`` is ``"thread"``, ``sync=False`` is ``"task"`` —
and, as a statement about the handler, it is taken as given: a ``def`` that
returns an awaitable runs as a task with ``sync=False``; beside
``isolation="process"`` it says how the handler runs in its process.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from .._util.aio import is_async_callable, on_asyncio
from ..events import Event
from ..policies import DropOldest, Latest, Lossless, Policy
from ._delivery.base import Delivery, Engine, Handler, Hook
from ._delivery.process import ProcessDelivery
from ._delivery.task import TaskDelivery
from ._delivery.thread import ThreadDelivery

__all__ = ["ISOLATIONS", "Isolation", "Plan", "SubscribeOptions", "default_name", "plan"]

#: where a subscriber's handler runs: a task, a thread, or a child process of its own
Isolation = Literal["task", "thread", "process"]
ISOLATIONS: tuple[Isolation, ...] = ("task", "thread", "process")


@dataclass(frozen=True, slots=True)
class SubscribeOptions:
    """Everything a subscriber is beside its handler (see :meth:`EventBus.subscribe`
    for each); ``on_interrupt`` is the package's own (see :meth:`EventBus.subscribe_with`)."""

    events: tuple[type[Event], ...] = (Event,)
    policy: Policy | None = None
    name: str | None = None
    timeout: float | None = None
    envelopes: bool = False
    run_key: str | None = None
    isolation: Isolation | None = None
    sync: bool | None = None
    on_start: Hook | None = None
    on_batch_end: Hook | None = None
    on_close: Hook | None = None
    hook_name: Callable[[Event | str], str] | None = None
    on_request: Callable[[bytes], None] | None = None
    #: ``on_start`` raised: the subscriber is disabled (its events count as dropped)
    requires_start: bool = False
    #: this many failed events in a row disable the subscriber (None: never)
    max_consecutive_failures: int | None = None
    #: ``KeyboardInterrupt``/``SystemExit`` from an ``async def`` handler goes here
    #: (on the loop) instead of cancelling the bus's block
    on_interrupt: Callable[[BaseException], None] | None = None


class Plan(NamedTuple):
    """A subscriber, checked, before it exists (:func:`plan`)."""

    handler: Handler
    options: SubscribeOptions
    events: tuple[type[Event], ...]
    policy: Policy
    isolation: Isolation
    #: the handler's result is awaited (on the loop, or on the child's loop)
    is_async: bool

    def build(self, engine: Engine, name: str) -> Delivery:
        """The delivery, on the loop thread. Raises ``TypeError`` for a ``"process"``
        handler or hook that cannot be pickled, ``ValueError`` for a wrong
        ``$EVSYS_START_METHOD``."""
        o = self.options
        common: dict[str, Any] = {
            "name": name,
            "events": self.events,
            "policy": self.policy,
            "timeout": o.timeout,
            "envelopes": o.envelopes,
            "run_key": o.run_key,
            "on_start": o.on_start,
            "on_batch_end": o.on_batch_end,
            "on_close": o.on_close,
            "on_interrupt": o.on_interrupt,
            "hook_name": o.hook_name,
            "requires_start": o.requires_start,
            "max_consecutive_failures": o.max_consecutive_failures,
        }
        if self.isolation == "process":
            return ProcessDelivery(
                engine,
                self.handler,
                child_async=self.is_async,
                backend="asyncio" if on_asyncio() else "trio",
                on_request=o.on_request,
                **common,
            )
        if self.isolation == "task":
            return TaskDelivery(engine, self.handler, **common)
        return ThreadDelivery(engine, self.handler, **common)


def plan(handler: Handler, options: SubscribeOptions) -> Plan:
    """Check ``handler`` and ``options`` and decide where the handler runs.

    Raises ``TypeError`` for a handler that cannot take one argument, a
    non-``Event`` type, a policy that is none of the three, or an ``isolation``
    that contradicts ``sync`` or the handler; ``ValueError`` for an unknown
    ``isolation``, a ``timeout`` that is not positive or a
    ``max_consecutive_failures`` below 1.
    """
    _check_handler(handler)
    types = tuple(options.events)
    for t in types:
        if not (isinstance(t, type) and issubclass(t, Event)):
            raise TypeError(
                f"subscribe(events=...) takes Event subclasses, got {t!r}; "
                "e.g. events=(ev.events.StepEnded,)"
            )
    policy = Lossless() if options.policy is None else options.policy
    if not isinstance(policy, Lossless | Latest | DropOldest):
        raise TypeError(f"policy must be Lossless(), Latest() or DropOldest(n), got {policy!r}")
    timeout = options.timeout
    if timeout is not None and timeout <= 0:
        raise ValueError(f"subscribe(timeout=...) must be > 0 or None, got {timeout}")
    limit = options.max_consecutive_failures
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(
            f"subscribe(max_consecutive_failures=...) must be an int >= 1 or None, got {limit!r}"
        )
    isolation, is_async = placement(handler, options.isolation, options.sync)
    return Plan(handler, options, types, policy, isolation, is_async)


def placement(
    handler: Handler, isolation: Isolation | None, sync: bool | None
) -> tuple[Isolation, bool]:
    """``(isolation, is_async)``: where ``handler`` runs and whether its result is
    awaited there (the module docstring has the rule)."""
    if isolation is not None and isolation not in ISOLATIONS:
        raise ValueError(
            f"subscribe(isolation=...) takes 'task', 'thread', 'process' or None, got {isolation!r}"
        )
    if sync is not None and isolation in ("task", "thread") and (isolation == "thread") != sync:
        raise TypeError(
            f"subscribe(isolation={isolation!r}, sync={sync}) contradict each other; "
            "give one of them"
        )
    if isolation == "task" and not is_async_callable(handler):
        raise TypeError(
            f"subscribe(isolation='task') runs the handler on the event loop, so it must "
            f"be async def; {default_name(handler)} is not (use isolation='thread')"
        )
    is_async = is_async_callable(handler) if sync is None else not sync
    if isolation == "thread":
        is_async = False
    if isolation is None:
        isolation = "task" if is_async else "thread"
    return isolation, is_async


def _check_handler(handler: Handler) -> None:
    if not callable(handler):
        raise TypeError(f"subscribe() takes a callable handler, got {handler!r}")
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None)
    except TypeError:
        raise TypeError(
            f"handler {default_name(handler)}{sig} must accept one positional argument "
            "(the event); e.g. `async def handler(event): ...`"
        ) from None


def default_name(handler: Any) -> str:
    """A subscriber's name when none is given: ``Class.method``, the function's name,
    or a callable object's class (through ``functools.partial``)."""
    while isinstance(handler, functools.partial):
        handler = handler.func
    owner = getattr(handler, "__self__", None)
    name = getattr(handler, "__name__", None)
    if name is None:  # a callable object
        return type(handler).__name__
    return f"{type(owner).__name__}.{name}" if owner is not None else str(name)
