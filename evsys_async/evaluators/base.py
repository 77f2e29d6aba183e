"""Evaluators: the protocol the loop calls, their lifecycle, and the registry of kinds.

An evaluator has ``name: str``, ``run_every: int`` (it fires after step k when
``(k + 1) % run_every == 0``; 0 never) and ``async def evaluate(state,
step_idx) -> Mapping[str, float]``. The loop runs the due ones concurrently,
each under ``eval_timeout``; a failure or timeout is a WARNING and an
``EvalFailed`` event, and training goes on.

Lifecycle: an evaluator may also define ``async def setup(state)`` and
``async def aclose()``. The loop calls :func:`open_evaluators` at run start,
before the first step, and :func:`close_evaluators` in its shutdown, after
the evals in flight have ended, under the shutdown deadline. Clients and
connections (an HTTP client, a remote session) open and close there.

Configs name evaluators by kind, like callbacks::

    evaluators:
      - kind: demo_accuracy
        params: {run_every: 10, name: val}

``@register_evaluator("kind")`` registers a class whose ``Config`` (a msgspec
Struct with ``forbid_unknown_fields=True``) lists its constructor's keyword
arguments; without ``Config`` the ``__init__`` signature is checked.
Third-party packages register through the entry-point group
``evsys_async.evaluators``. Validation and errors are the callback
registry's (:class:`~evsys_async._util.kinds.KindRegistry`), e.g.
``evaluators[0].params.run_evry (demo_accuracy): unknown field 'run_evry' —
did you mean 'run_every'?``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
import msgspec

from .._util.kinds import KindRegistry
from .._util.log import get_logger
from ..errors import PlacedConfigError, describe
from ..state import LoopState

__all__ = [
    "ENTRY_POINT_GROUP",
    "EVALUATORS",
    "Evaluator",
    "build_evaluators",
    "close_evaluators",
    "get_evaluator",
    "list_evaluators",
    "open_evaluators",
    "register_evaluator",
]

_log = get_logger()

ENTRY_POINT_GROUP = "evsys_async.evaluators"

E = TypeVar("E", bound=type)


@runtime_checkable
class Evaluator(Protocol):
    """What the loop needs of an evaluator.

    Optional, found by name: ``async def setup(state)`` (run start) and
    ``async def aclose()`` (the run's shutdown); see :func:`open_evaluators`.
    """

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


# -- lifecycle -------------------------------------------------------------------------


def _hook(ev: Evaluator, name: str) -> Callable[..., Any] | None:
    hook = getattr(ev, name, None)
    return hook if callable(hook) else None


async def open_evaluators(
    evaluators: Iterable[Evaluator], state: LoopState, *, timeout: float | None = None
) -> None:
    """Call ``await ev.setup(state)`` on each evaluator that has it, concurrently,
    each under ``timeout`` seconds.

    Never raises for an evaluator: a setup that raises or times out is logged
    at WARNING and training goes on (that evaluator's evals then fail, each an
    ``EvalFailed``, as its own errors say). A cancellation propagates.
    """
    opening = [(ev, hook) for ev in evaluators if (hook := _hook(ev, "setup")) is not None]
    if not opening:
        return

    async def one(ev: Evaluator, hook: Callable[..., Any]) -> None:
        try:
            with anyio.fail_after(timeout):
                result = hook(state)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            _log.warning(
                "evaluator setup failed; its evals will fail, training goes on",
                evaluator=getattr(ev, "name", type(ev).__name__),
                error=describe(exc, timeout=timeout),
                exc_info=exc,
            )

    async with anyio.create_task_group() as tg:
        for ev, hook in opening:
            tg.start_soon(one, ev, hook)


async def close_evaluators(
    evaluators: Iterable[Evaluator], *, timeout: float | None = None
) -> bool:
    """Call ``await ev.aclose()`` on each evaluator that has it, concurrently, all
    within ``timeout`` seconds; ``False`` if the deadline cut one short.

    Never raises for an evaluator (failures are logged at WARNING). Each
    ``aclose`` is called whether or not its ``setup`` succeeded, so it must
    release what it holds and tolerate holding nothing.
    """
    closing = [(ev, hook) for ev in evaluators if (hook := _hook(ev, "aclose")) is not None]
    if not closing:
        return True

    async def one(ev: Evaluator, hook: Callable[[], Any]) -> None:
        try:
            result = hook()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            _log.warning(
                "evaluator aclose failed",
                evaluator=getattr(ev, "name", type(ev).__name__),
                error=describe(exc),
                exc_info=exc,
            )

    with anyio.move_on_after(timeout) as scope:
        async with anyio.create_task_group() as tg:
            for ev, hook in closing:
                tg.start_soon(one, ev, hook)
    if scope.cancelled_caught:
        _log.warning(
            "evaluators still closing at the shutdown deadline; cut short",
            evaluators=[getattr(ev, "name", type(ev).__name__) for ev, _ in closing],
        )
        return False
    return True
