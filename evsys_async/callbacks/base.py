"""Callback: the original system's hooks, each ``def`` or ``async def``; ``dispatch``;
the adapter that turns a callback into one bus subscriber.

Which hook runs: for a loop-scope event exactly one hook runs,
the named hook of the nearest class in the event's MRO that the callback
overrides, otherwise ``on_event``. ``on_envelope`` additionally sees every
event with its sequence number. Experiment-scope hooks are called only by
:func:`dispatch`.

A callback is subscribed only to the events of the hooks it overrides, and
it is decided once, at subscribe time, whether it runs in a task (every
overridden hook, ``setup``, ``teardown`` and ``flush`` is ``async def``) or in
its own daemon thread (any of them is ``def``; its ``async def`` hooks are then
run on the event loop from that thread, one at a time, in order). A callback
with ``isolation = "process"`` runs in a child process of its own
(``_remote.py`` is what crosses; ``docs/isolation.md``), where the same choice
is made again.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, cast

import anyio
import anyio.from_thread
import anyio.lowlevel

from .._util.aio import is_async_callable
from .._util.log import get_logger
from .._util.worker import DaemonWorker
from ..bus import EventBus, Isolation, Subscription
from ..bus._subscribe import SubscribeOptions
from ..errors import describe
from ..events import (
    BenchmarkEvaluated,
    CheckpointSaved,
    Envelope,
    EvalEnded,
    Event,
    ExperimentEnded,
    ExperimentStarted,
    GroupStarted,
    RunEnded,
    RunStarted,
    StepEnded,
    TrainEnded,
    TrainStarted,
)
from ..policies import Lossless, Policy
from ..state import LoopArtifacts, LoopState, Status
from ._requests import apply

__all__ = [
    "EXPERIMENT_HOOKS",
    "ISOLATIONS",
    "LOOP_HOOKS",
    "Callback",
    "CallbackAdapter",
    "Hooks",
    "dispatch",
    "overrides",
]

#: what ``Callback.isolation`` may be (None: a task or a thread, by its hooks)
ISOLATIONS = ("task", "thread", "process")

_log = get_logger()

#: event type -> the named loop-scope hook it drives, and that hook's arity (with state)
LOOP_HOOKS: dict[type[Event], tuple[str, int]] = {
    TrainStarted: ("on_train_start", 1),
    StepEnded: ("on_step_end", 4),
    EvalEnded: ("on_eval", 4),
    CheckpointSaved: ("on_checkpoint", 2),
    TrainEnded: ("on_train_end", 2),
}

#: experiment-scope hooks and their positional arity; called only through dispatch
EXPERIMENT_HOOKS: dict[str, int] = {
    "on_experiment_start": 1,
    "on_group_start": 2,
    "on_run_start": 1,
    "on_benchmark_eval": 3,
    "on_run_end": 3,
    "on_experiment_end": 2,
}

_EXPERIMENT_EVENTS = (
    ExperimentStarted,
    GroupStarted,
    RunStarted,
    BenchmarkEvaluated,
    RunEnded,
    ExperimentEnded,
)

#: the subscription's lifecycle slots and the callback hooks that fill them
_LIFECYCLE = {"on_start": "setup", "on_batch_end": "flush", "on_close": "teardown"}

_OTHER_HOOKS: dict[str, int] = {"on_event": 2, "on_envelope": 2, "setup": 1, "teardown": 1}

#: the methods a callback's subscription runs (its thread-or-task choice looks at these)
_ROUTED = (*(hook for hook, _ in LOOP_HOOKS.values()), *_OTHER_HOOKS, "flush")


class Callback:
    """Base class of every callback; every hook is a no-op until overridden.

    Override any hook with ``def`` (runs in the callback's own thread, so
    blocking I/O there stalls nothing) or ``async def`` (runs on the event
    loop: await, don't compute — CPU work or ``time.sleep`` in an ``async
    def`` hook stalls the loop). Class attributes tune delivery:

    * ``policy`` — ``Lossless()`` (default), ``Latest()`` or ``DropOldest(n)``;
    * ``hook_timeout`` — seconds per hook call, ``None`` for no limit;
    * ``controls_loop`` — the loop waits for this callback after each event it
      handles, so a ``request_stop`` on step k's event stops before step k+1;
    * ``wants_batch`` — ``on_step_end`` gets the live batch (else ``None``);
    * ``isolation`` — ``None`` (a task if every hook is ``async def``, else its
      own thread), ``"thread"``, ``"task"``, or ``"process"``: a child process
      of its own, for callbacks that compute (``docs/isolation.md``).

    ``built_from`` is ``(kind, params)`` when :func:`build_callbacks` built the
    callback from a config entry (a process callback is then built again from
    them in its process, instead of being pickled), else ``None``.

    A subclass need not call ``super().__init__()``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None
    policy: ClassVar[Policy] = Lossless()
    hook_timeout: ClassVar[float | None] = None
    controls_loop: ClassVar[bool] = False
    wants_batch: ClassVar[bool] = False
    isolation: str | None = None
    built_from: tuple[str, dict[str, Any]] | None = None

    # -- loop scope --------------------------------------------------------------
    def on_train_start(self, state: LoopState) -> Any: ...
    def on_step_end(
        self, state: LoopState, step_idx: int, batch: Any, metrics: dict[str, float]
    ) -> Any: ...
    def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> Any: ...
    def on_checkpoint(self, state: LoopState, row: dict[str, Any]) -> Any: ...
    def on_train_end(self, state: LoopState, artifacts: LoopArtifacts) -> Any: ...
    def on_event(self, state: LoopState, event: Event) -> Any: ...
    def on_envelope(self, state: LoopState, envelope: Envelope) -> Any: ...
    def flush(self) -> Any: ...
    def setup(self, state: LoopState) -> Any: ...
    def teardown(self, state: LoopState) -> Any: ...

    # -- experiment scope --------------------------------------------------------
    def on_experiment_start(self, ctx: Any) -> Any: ...
    def on_group_start(self, ctx: Any, group_name: str) -> Any: ...
    def on_run_start(self, ctx: Any) -> Any: ...
    def on_benchmark_eval(
        self, ctx: Any, eval_result: Any, predictions: Any, *, step: int | None = None
    ) -> Any: ...
    def on_run_end(self, ctx: Any, run_result: Any, arm: Any) -> Any: ...
    def on_experiment_end(self, ctx: Any, result: Any) -> Any: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"


def overrides(cb: object, hook: str) -> bool:
    """True if ``cb``'s class overrides ``hook`` of :class:`Callback` (or defines it)."""
    own = getattr(type(cb), hook, None)
    return own is not None and own is not getattr(Callback, hook, None)


def _check_signature(cb: object, hook: str, arity: int) -> None:
    method = getattr(cb, hook)
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*([None] * arity))
    except TypeError:
        expected = inspect.signature(getattr(Callback, hook))
        raise TypeError(
            f"{type(cb).__name__}.{hook}{sig} cannot take the hook's arguments; "
            f"define it as `def {hook}{expected}` (or async def)"
        ) from None


class CallbackAdapter:
    """Subscribes one callback to a bus as one subscriber, for one run's state.

    The loop owns one adapter per callback per run. ``offer_batch`` hands the
    live batch out of band to ``wants_batch`` callbacks (only the newest is
    held: an older step's ``on_step_end`` gets ``None``).
    """

    def __init__(self, callback: Callback, state: LoopState) -> None:
        self.callback = callback
        self.state = state
        # reported and logged under its name: the registered kind (csv_metrics), else its class
        self.name = str(getattr(callback, "name", "") or type(callback).__name__)
        self._batch: tuple[int, Any] | None = None
        for hook, arity in {
            **dict(LOOP_HOOKS.values()),
            **_OTHER_HOOKS,
            **EXPERIMENT_HOOKS,
        }.items():
            if overrides(callback, hook):
                _check_signature(callback, hook, arity)
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
            h: is_async_callable(getattr(callback, h)) for h in _ROUTED if overrides(callback, h)
        }
        self.is_async = bool(self._async_hook) and all(self._async_hook.values())
        self.isolation: str | None = _isolation_of(callback, self.is_async)
        if self.isolation == "thread":
            self.is_async = False  # its async def hooks run on the loop, from its thread
        # class attributes, which an instance may shadow (a progress bar picks
        # Latest on a TTY and Lossless elsewhere)
        self.policy: Policy = getattr(callback, "policy", None) or Lossless()
        self.timeout: float | None = getattr(callback, "hook_timeout", None)
        self.subscription: Subscription | None = None
        self.control_timeouts = 0
        self._token: Any = None
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
        if hook is None and self._wants_event and not issubclass(event_type, _EXPERIMENT_EVENTS):
            hook = "on_event"
        self._hook_cache[event_type] = hook
        return hook

    def handles(self, event_type: type[Event]) -> bool:
        """True if an event of this type reaches this callback at all."""
        return self._wants_envelope or self.hook_for(event_type) is not None

    def offer_batch(self, step: int, batch: Any) -> None:
        self._batch = (step, batch)

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

    def _label(self, event: Event | str) -> str:
        if isinstance(event, str):  # a lifecycle slot of the subscription
            return _LIFECYCLE.get(event, event)
        return self.hook_for(type(event)) or "on_envelope"

    def _handler(self) -> Callable[[Any], Any]:
        callers, caller = self._callers, self._caller
        if not self._wants_envelope:
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

    def subscribe(
        self,
        bus: EventBus,
        *,
        run_key: str | None = None,
        on_interrupt: Callable[[BaseException], None] | None = None,
    ) -> Subscription:
        """Subscribe the callback; ``setup``/``teardown``/``flush`` run in its thread or task
        (or, with ``isolation = "process"``, in its own process).

        ``on_interrupt`` gets a ``KeyboardInterrupt``/``SystemExit`` that one of its
        ``async def`` hooks raised (the run ends as cancelled), instead of the bus
        cancelling its block. Raises ``TypeError`` for a process callback that
        cannot be pickled, and what :meth:`EventBus.subscribe` raises."""
        on_request: Callable[[bytes], None] | None = None
        isolation: Isolation | None = None  # a task or a thread: ``sync`` says which
        if self.isolation == "process":
            from ._remote import RemoteCallback  # it builds adapters in the child

            hooks = RemoteCallback(self).hooks()
            isolation = "process"
            on_request = self._apply_request
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
            hook_name=self._label,
            on_request=on_request,
            on_interrupt=on_interrupt,
        )
        self.subscription = bus.subscribe_with(hooks.handler, options)
        self.name = self.subscription.name
        return self.subscription

    def state_call(self, method: str, *args: Any) -> Callable[[], Any]:
        """``callback.<method>(*args)`` as a function to hand to ``Subscription.call``: it
        reaches the callback where it lives (in its own process, the copy there)."""
        if self.isolation == "process":
            from ._remote import call_remote

            return functools.partial(call_remote, method, *args)
        return functools.partial(getattr(self.callback, method), *args)

    def _apply_request(self, data: bytes) -> None:
        """What the callback's process asked of the run (in the subscriber's feeder
        thread, before the batch in hand counts as done). Raises ``ValueError`` for a
        request it does not know (the bus logs it as a WARNING)."""
        apply(self.state, data, callback=self.name)


class Hooks(NamedTuple):
    """What runs a callback as one subscriber: ``CallbackAdapter.bind()``."""

    handler: Callable[[Any], Any]
    on_start: Callable[[], Any] | None
    on_batch_end: Callable[[], Any] | None
    on_close: Callable[[], Any] | None


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


def _guarded(method: Callable[..., Any], args: Any, kwargs: Any) -> BaseException | None:
    try:
        method(*args, **kwargs)
    except BaseException as exc:  # handed back as the callback's failure
        return exc
    return None


async def dispatch(callbacks: Sequence[object], hook: str, *args: Any, **kwargs: Any) -> None:
    """Call ``hook`` on each callback in list order, each call isolated.

    ``async def`` hooks are awaited; ``def`` hooks run in a daemon thread (the
    loop stays responsive) and are awaited. A hook that raises is logged at
    WARNING with the callback's class and the hook, and the next callback
    runs: in a ``def`` hook's thread that holds for any ``BaseException``.
    Cancellation, and ``KeyboardInterrupt``/``SystemExit`` from an ``async def``
    hook, propagate. Callbacks without the hook are skipped.
    """
    worker: DaemonWorker | None = None
    try:
        for cb in callbacks:
            method = getattr(cb, hook, None)
            if method is None:
                continue
            if isinstance(cb, Callback) and not overrides(cb, hook):
                continue
            error: BaseException | None = None
            try:
                if is_async_callable(method):
                    await method(*args, **kwargs)
                else:
                    if worker is None:
                        worker = DaemonWorker(f"evsys-dispatch:{hook}")
                    # in its thread anything it raises is its failure, BaseException too
                    error = await worker.call(_guarded, method, args, kwargs)
            except (Exception, GeneratorExit, BaseExceptionGroup) as exc:
                error = exc
            if error is not None:
                _log.warning(
                    "callback failed",
                    callback=type(cb).__name__,
                    hook=hook,
                    error=describe(error),
                    exc_info=error,
                )
    finally:
        if worker is not None:
            worker.close()
