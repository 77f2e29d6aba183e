"""HookRunner: one callback's hooks as a bus handler and lifecycle hooks, for one run's
state — which hook an event drives, with what arguments, in a task or a thread.

Decided once, when the runner is made, not at the first event: the hook
signatures (checked), the event types the callback is subscribed to (those of
the hooks it overrides), and whether it runs in a task (every routed hook is
``async def``) or in its own thread. Per event the handler costs one dict
lookup and the hook call: the caller for each event type is built on first
sight and kept.

The runtime's adapter (``_adapter.py``) subscribes a runner to the bus; in a
callback's own process ``_remote.py`` builds a runner there and runs its
handler. ``docs/design.md`` ("Callbacks") has the rules this implements.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, cast

import anyio.from_thread
import anyio.lowlevel

from .._util.aio import is_async_callable
from ..events import Envelope, Event, TrainEnded
from ..policies import Lossless, Policy
from ..state import LoopArtifacts, LoopState, Status
from ._hooks import (
    EXPERIMENT_EVENTS,
    EXPERIMENT_HOOKS,
    ISOLATIONS,
    LIFECYCLE,
    LOOP_HOOKS,
    OTHER_HOOKS,
    ROUTED,
    check_signature,
    overrides,
)
from .base import Callback

__all__ = ["HookRunner", "Hooks"]


class Hooks(NamedTuple):
    """What runs a callback as one subscriber: :meth:`HookRunner.bind`."""

    handler: Callable[[Any], Any]
    on_start: Callable[[], Any] | None
    on_batch_end: Callable[[], Any] | None
    on_close: Callable[[], Any] | None


class HookRunner:
    """One callback's hooks for one run's state (see the module docstring).

    ``offer_batch`` hands the live batch out of band to ``wants_batch``
    callbacks (only the newest is held: an older step's ``on_step_end`` gets
    ``None``). Raises ``TypeError`` for a hook that cannot take its arguments or
    ``isolation = "task"`` with a ``def`` hook, ``ValueError`` for an unknown
    ``isolation``.
    """

    def __init__(self, callback: Callback, state: LoopState) -> None:
        self.callback = callback
        self.state = state
        # reported and logged under its name: the registered kind (csv_metrics), else its class
        self.name = str(getattr(callback, "name", "") or type(callback).__name__)
        self._batch: tuple[int, Any] | None = None
        for hook, arity in {
            **dict(LOOP_HOOKS.values()),
            **OTHER_HOOKS,
            **EXPERIMENT_HOOKS,
        }.items():
            if overrides(callback, hook):
                check_signature(callback, hook, arity)
        self._wants_event = overrides(callback, "on_event")
        self._wants_envelope = overrides(callback, "on_envelope")
        self._hook_cache: dict[type[Event], str | None] = {}
        self.event_types: tuple[type[Event], ...]
        if self._wants_event or self._wants_envelope:
            self.event_types = (Event,)
        else:
            self.event_types = tuple(
                t for t, (hook, _) in LOOP_HOOKS.items() if overrides(callback, hook)
            )
        # decided once, at subscribe time, not at the first event: which hooks are
        # coroutine functions, and so whether the callback runs in a task (all async)
        # or in its own thread
        self._async_hook = {
            h: is_async_callable(getattr(callback, h)) for h in ROUTED if overrides(callback, h)
        }
        self.is_async = bool(self._async_hook) and all(self._async_hook.values())
        self.isolation: str | None = _isolation_of(callback, self.is_async)
        if self.isolation == "thread":
            self.is_async = False  # its async def hooks run on the loop, from its thread
        # class attributes, which an instance may shadow (a progress bar picks
        # Latest on a TTY and Lossless elsewhere)
        self.policy: Policy = getattr(callback, "policy", None) or Lossless()
        self.timeout: float | None = getattr(callback, "hook_timeout", None)
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._callers: dict[type[Event], Callable[[Any], Any]] = {}

    @property
    def controls_loop(self) -> bool:
        return bool(getattr(self.callback, "controls_loop", False))

    def hook_for(self, event_type: type[Event]) -> str | None:
        """The hook that handles ``event_type`` for this callback, or ``None``."""
        try:
            return self._hook_cache[event_type]
        except KeyError:
            pass
        hook: str | None = None
        for klass in event_type.__mro__:
            named = LOOP_HOOKS.get(klass)
            if named is not None and overrides(self.callback, named[0]):
                hook = named[0]
                break
        if hook is None and self._wants_event and not issubclass(event_type, EXPERIMENT_EVENTS):
            hook = "on_event"
        self._hook_cache[event_type] = hook
        return hook

    def handles(self, event_type: type[Event]) -> bool:
        """True if an event of this type reaches this callback at all."""
        return self._wants_envelope or self.hook_for(event_type) is not None

    def offer_batch(self, step: int, batch: Any) -> None:
        self._batch = (step, batch)

    def label(self, event: Event | str) -> str:
        """The hook to name in a failure log: the event's hook, or the callback hook
        that fills a lifecycle slot (``on_start`` -> ``setup``)."""
        if isinstance(event, str):  # a lifecycle slot of the subscription
            return LIFECYCLE.get(event, event)
        return self.hook_for(type(event)) or "on_envelope"

    def bind(self) -> Hooks:
        """The handler and lifecycle hooks that run this callback, bound to the running
        event loop (called on its thread: an ``async def`` hook of a callback that
        runs in a thread reaches the loop through its token)."""
        cb = self.callback
        state = self.state
        self._token = anyio.lowlevel.current_token()

        def hook(name: str, *args: Any) -> Callable[[], Any] | None:
            if not overrides(cb, name):
                return None
            method = getattr(cb, name)
            return lambda: method(*args)

        return Hooks(self._handler(), hook("setup", state), hook("flush"), hook("teardown", state))

    # -- the per-event path --------------------------------------------------------

    def _bind(self, hook: str, m: Callable[..., Any]) -> Callable[[Any], Any]:
        """``event -> m(<the hook's arguments>)``, decided once per hook, not per call."""
        state = self.state
        if hook == "on_step_end":
            if not getattr(self.callback, "wants_batch", False):
                return lambda e: m(state, e.step, None, e.metrics)

            def with_batch(e: Any) -> Any:
                held = self._batch  # only the newest batch is held
                return m(state, e.step, held[1] if held and held[0] == e.step else None, e.metrics)

            return with_batch
        if hook == "on_eval":
            return lambda e: m(state, e.step, e.eval_name, e.metrics)
        if hook == "on_checkpoint":
            return lambda e: m(state, e.row)
        if hook == "on_train_end":
            return lambda e: m(state, self._artifacts(e))
        if hook == "on_train_start":
            return lambda e: m(state)
        return lambda e: m(state, e)

    def _caller(self, event_type: type[Event]) -> Callable[[Any], Any]:
        """Calls the hook for ``event_type``: in a task it returns the hook's coroutine
        (the bus awaits it: no wrapper coroutine per event); in the callback's thread
        it runs the hook, an ``async def`` one on the loop."""
        hook = self.hook_for(event_type)
        caller: Callable[[Any], Any]
        if hook is None:
            caller = _async_nothing if self.is_async else _nothing
        else:
            method = getattr(self.callback, hook)
            if self.is_async or not self._async_hook[hook]:
                caller = self._bind(hook, method)
            else:  # an async hook of a callback that runs in its thread
                args, token = self._bind(hook, _as_tuple), self._token
                caller = lambda e: anyio.from_thread.run(method, *args(e), token=token)  # noqa: E731
        self._callers[event_type] = caller
        return caller

    def _only_hook(self) -> type[Event] | None:
        """The event type whose caller serves every event this callback is sent, when
        there is one: it overrides one named hook and not ``on_event`` (every event it
        gets, subclasses included, goes to that hook, with the same arguments)."""
        if self._wants_event or len(self.event_types) != 1:
            return None
        return self.event_types[0]

    def _artifacts(self, event: TrainEnded) -> LoopArtifacts:
        if self.state.artifacts is not None:
            return self.state.artifacts
        return LoopArtifacts(
            run_dir=Path(self.state.output_dir),
            total_requested_steps=event.num_steps,
            steps_completed=event.steps_completed,
            status=cast(Status, event.status),
            stop_reason=event.stop_reason,
            train_seconds=event.train_seconds,
            error=event.error,
        )

    def _handler(self) -> Callable[[Any], Any]:
        callers, caller = self._callers, self._caller
        if not self._wants_envelope:
            only = self._only_hook()
            if only is not None:  # one hook for every event it gets: the caller itself
                return caller(only)
            # events, not envelopes: one dict lookup and the hook itself
            return lambda e: (callers.get(type(e)) or caller(type(e)))(e)
        on_envelope, state = self.callback.on_envelope, self.state
        if self.is_async:

            async def handle_async(env: Envelope) -> None:
                try:
                    await (callers.get(type(env.event)) or caller(type(env.event)))(env.event)
                finally:
                    await on_envelope(state, env)

            return handle_async
        token, envelope_is_async = self._token, self._async_hook["on_envelope"]

        def handle(env: Envelope) -> None:
            try:
                (callers.get(type(env.event)) or caller(type(env.event)))(env.event)
            finally:
                if envelope_is_async:
                    anyio.from_thread.run(on_envelope, state, env, token=token)
                else:
                    on_envelope(state, env)

        return handle


def _isolation_of(callback: object, is_async: bool) -> str | None:
    """The callback's ``isolation``, checked: ``ValueError`` for an unknown one,
    ``TypeError`` for ``"task"`` with a ``def`` hook."""
    value = getattr(callback, "isolation", None)
    name = type(callback).__name__
    if value is not None and value not in ISOLATIONS:
        raise ValueError(
            f"{name}.isolation must be None, 'task', 'thread' or 'process', got {value!r}"
        )
    if value == "task" and not is_async:
        raise TypeError(
            f"{name}.isolation = 'task' runs it on the event loop, so every hook it "
            "overrides must be async def; use 'thread' (or None) for def hooks"
        )
    return cast(str | None, value)


def _as_tuple(*args: Any) -> tuple[Any, ...]:
    return args


def _nothing(event: Any) -> None:
    return None


async def _async_nothing(event: Any) -> None:
    return None
