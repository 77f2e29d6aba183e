"""The hooks of :class:`~evsys_async.callbacks.base.Callback` as data: which event drives
which hook, how many arguments each takes, and whether a callback overrides one.

The adapter (``_adapter.py``), ``dispatch`` (``_dispatch.py``), the registry
and the experiment read these tables; a hook signature is checked against them
once, when the callback is subscribed, not at its first event.
"""

from __future__ import annotations

import inspect

from ..events import (
    BenchmarkEvaluated,
    CheckpointSaved,
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
from .base import Callback

__all__ = [
    "EXPERIMENT_EVENTS",
    "EXPERIMENT_HOOKS",
    "ISOLATIONS",
    "LIFECYCLE",
    "LOOP_HOOKS",
    "OTHER_HOOKS",
    "ROUTED",
    "check_signature",
    "overrides",
]

#: what ``Callback.isolation`` may be (None: a task or a thread, by its hooks)
ISOLATIONS = ("task", "thread", "process")

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

#: the events of the experiment-scope hooks: never routed to ``on_event``
EXPERIMENT_EVENTS = (
    ExperimentStarted,
    GroupStarted,
    RunStarted,
    BenchmarkEvaluated,
    RunEnded,
    ExperimentEnded,
)

#: the subscription's lifecycle slots and the callback hooks that fill them
LIFECYCLE = {"on_start": "setup", "on_batch_end": "flush", "on_close": "teardown"}

#: the other hooks a subscription runs, and their arity
OTHER_HOOKS: dict[str, int] = {"on_event": 2, "on_envelope": 2, "setup": 1, "teardown": 1}

#: the methods a callback's subscription runs (its thread-or-task choice looks at these)
ROUTED = (*(hook for hook, _ in LOOP_HOOKS.values()), *OTHER_HOOKS, "flush")


def overrides(cb: object, hook: str) -> bool:
    """True if ``cb``'s class overrides ``hook`` of :class:`Callback` (or defines it)."""
    own = getattr(type(cb), hook, None)
    return own is not None and own is not getattr(Callback, hook, None)


def check_signature(cb: object, hook: str, arity: int) -> None:
    """Raise ``TypeError`` if ``cb.<hook>`` cannot take ``arity`` positional arguments,
    naming the signature it should have."""
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
