"""Evaluators: the protocol the loop calls, and the registry of kinds configs name.

An evaluator has ``name: str``, ``run_every: int`` (it fires after step k when
``(k + 1) % run_every == 0``; 0 never) and ``async def evaluate(state,
step_idx) -> Mapping[str, float]``. The loop runs the due ones concurrently,
each under ``eval_timeout``; a failure or timeout is a WARNING and an
``EvalFailed`` event, and training goes on.

Configs name evaluators by kind, like callbacks::

    evaluators:
      - kind: demo_accuracy
        params: {run_every: 10, name: val}

``@register_evaluator("kind")`` registers a class whose ``Config`` (a msgspec
Struct with ``forbid_unknown_fields=True``) lists its constructor's keyword
arguments; without ``Config`` the ``__init__`` signature is checked.
Third-party packages register through the entry-point group
``evsys_async.evaluators``. Validation and errors are the callback
registry's (:class:`~evsys_async.callbacks.registry.KindRegistry`), e.g.
``evaluators[0].params.run_evry (demo_accuracy): unknown field 'run_evry' —
did you mean 'run_every'?``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import msgspec

from .callbacks.registry import KindRegistry, PlacedConfigError
from .state import LoopState

__all__ = [
    "ENTRY_POINT_GROUP",
    "Evaluator",
    "build_evaluators",
    "get_evaluator",
    "list_evaluators",
    "register_evaluator",
]

ENTRY_POINT_GROUP = "evsys_async.evaluators"

E = TypeVar("E", bound=type)


@runtime_checkable
class Evaluator(Protocol):
    """What the loop needs of an evaluator."""

    name: str
    run_every: int

    async def evaluate(self, state: LoopState, step_idx: int) -> Mapping[str, Any]: ...


def _check_evaluator(cls: type) -> None:
    if not isinstance(cls, type) or not callable(getattr(cls, "evaluate", None)):
        raise TypeError(
            f"an evaluator kind must be a class with `async def evaluate(state, step_idx)`, "
            f"got {cls!r}"
        )
    config = getattr(cls, "Config", None)
    if config is not None and not (isinstance(config, type) and issubclass(config, msgspec.Struct)):
        raise TypeError(f"{cls.__name__}.Config must be a msgspec.Struct, got {config!r}")


#: Built-in kinds that live above this module in the import order (the demo's
#: evaluator needs the demo's model): imported on first lookup, like entry points.
_LAZY_BUILTINS = {"demo_accuracy": "evsys_async.demo:DemoAccuracy"}

EVALUATORS: KindRegistry[type] = KindRegistry(
    "evaluator",
    group=ENTRY_POINT_GROUP,
    check=_check_evaluator,
    lazy=_LAZY_BUILTINS,
    name_attr="kind",
)


def register_evaluator(name: str, *, replace: bool = False) -> Callable[[E], E]:
    """Class decorator: register an evaluator class under the kind ``name``.

    Sets ``cls.kind = name`` and, when the class has no ``name``, ``cls.name =
    name`` (the eval name events carry; an instance may set its own). The same
    class again replaces itself; a different class under a taken kind raises
    :class:`~evsys_async.errors.ConfigError` unless ``replace=True``.
    """

    def decorate(cls: E) -> E:
        EVALUATORS.register(name, cls, replace=replace)
        if not hasattr(cls, "name"):
            cls.name = name  # type: ignore[attr-defined]
        return cls

    return decorate


def get_evaluator(kind: str, *, place: str | tuple[str | int, ...] = ()) -> type:
    """The class registered under ``kind``; :class:`ConfigError` names close kinds."""
    return EVALUATORS.get(kind, place=place)


def list_evaluators() -> dict[str, type]:
    """Every evaluator kind, sorted by name (lazy built-ins and entry points included)."""
    return EVALUATORS.all()


def build_evaluators(
    specs: Iterable[Any], *, place: str | tuple[str | int, ...] = "evaluators"
) -> list[Evaluator]:
    """Build evaluators from ``{kind, params}`` specs (dicts or objects with
    ``kind`` and ``params``). Every spec is validated before any is built.

    Raises :class:`ConfigError` naming the place, e.g. ``evaluators[0].kind: no
    evaluator kind 'demo_acc' — did you mean 'demo_accuracy'?``; an object
    built that lacks ``name``, ``run_every`` or ``evaluate`` is a ConfigError too.
    """
    built = EVALUATORS.build(specs, place=place)
    for i, ev in enumerate(built):
        missing = [a for a in ("name", "run_every", "evaluate") if not hasattr(ev, a)]
        if missing:
            raise PlacedConfigError(
                (place, i) if isinstance(place, str) else (*place, i),
                f"{type(ev).__name__} lacks {', '.join(missing)}: an evaluator needs "
                "`name`, `run_every` and `async def evaluate(state, step_idx)`",
                kind=getattr(ev, "kind", None),
            )
    return built
