"""The callback registry: ``@register_callback``, ``build_callbacks``, ``CallbackSpec``.

A registered class has ``name`` and, usually, a ``Config`` ClassVar: a msgspec
Struct with ``forbid_unknown_fields=True`` whose fields are the constructor's
keyword arguments. ``build_callbacks`` validates each spec's ``params``
against it before constructing, so a typo fails before the run starts, with
the place and the likely name::

    callbacks[1].params.patiense (early_stopping): unknown field 'patiense'
        — did you mean 'patience'?

Third-party packages register through the entry-point group
``evsys_async.callbacks`` (``name = "package.module:Class"``); the group is
read on the first lookup and each entry point is imported when its kind is
first needed, so a broken plug-in fails only the configs that name it. The
built-ins are known the same way, as a table of kind -> ``"module:Class"``
imported on first lookup (importing ``evsys_async.callbacks`` imports them
all anyway), so this module imports none of them: a built-in imports the
registry, never the other way round.

:class:`~evsys_async._util.kinds.KindRegistry` is the machinery, shared with the
evaluator registry (``evaluators/base.py``). Its errors are
:class:`~evsys_async.errors.PlacedConfigError`, a ``ConfigError`` that also
carries the place as a path (``("callbacks", 1, "params", "patiense")``) so
that a config loader can map it to a file and line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

import msgspec

from .._util.kinds import KindRegistry
from ..errors import ConfigPath, PlacedConfigError
from ._hooks import ISOLATIONS
from .base import Callback

__all__ = [
    "CALLBACKS",
    "ENTRY_POINT_GROUP",
    "CallbackSpec",
    "PlacedConfigError",
    "build_callbacks",
    "get_callback",
    "list_callbacks",
    "register_callback",
]

ENTRY_POINT_GROUP = "evsys_async.callbacks"

Path = ConfigPath
C = TypeVar("C", bound=type[Callback])


class CallbackSpec(msgspec.Struct, forbid_unknown_fields=True):
    """``{kind, params, isolation}``: which registered callback to build, with what
    arguments, and (optionally) where it runs: ``"process"`` for its own process,
    ``"thread"``, ``"task"``, or ``None`` for the class's own choice."""

    kind: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    isolation: Literal["task", "thread", "process"] | None = None


# -- callbacks -----------------------------------------------------------------------


def _check_callback(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise TypeError(f"a callback kind must be a Callback subclass, got {cls!r}")
    config = getattr(cls, "Config", None)
    if config is not None and not (isinstance(config, type) and issubclass(config, msgspec.Struct)):
        raise TypeError(f"{cls.__name__}.Config must be a msgspec.Struct, got {config!r}")


#: the built-in kinds, imported on first lookup like entry points (each module
#: registers its class with ``@register_callback`` when it is imported)
_BUILTINS = {
    kind: f"evsys_async.callbacks.{kind}:{cls}"
    for kind, cls in {
        "csv_metrics": "CsvMetricsCallback",
        "debug_logger": "DebugLoggerCallback",
        "early_stopping": "EarlyStoppingCallback",
        "evsys_logger": "EvsysLoggerCallback",
        "local_logger": "LocalLoggerCallback",
        "print_progress": "PrintProgressCallback",
        "tensorboard_logger": "TensorBoardLoggerCallback",
        "wandb_logger": "WandbLoggerCallback",
    }.items()
}
_BUILTINS["mlflow"] = "evsys_async.callbacks.mlflow_logger:MlflowLoggerCallback"


def _built(cb: Callback, kind: str, params: dict[str, Any], options: dict[str, Any]) -> None:
    """Record where a callback came from (a process callback is built again from it in
    its process) and the entry's ``isolation``, which shadows the class's."""
    cb.built_from = (kind, params)
    if "isolation" in options:
        cb.isolation = options["isolation"]


CALLBACKS: KindRegistry[type[Callback]] = KindRegistry(
    "callback",
    group=ENTRY_POINT_GROUP,
    check=_check_callback,
    lazy=_BUILTINS,
    options={"isolation": ISOLATIONS},
    on_built=_built,
)


def register_callback(name: str, *, replace: bool = False) -> Callable[[C], C]:
    """Class decorator: register a :class:`Callback` subclass under ``name``.

    Registering the same class (same qualified name) again replaces it; a
    different class under a taken name raises :class:`ConfigError` unless
    ``replace=True``. Sets ``cls.name = name``.
    """

    def decorate(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise TypeError(
                f"@register_callback({name!r}) decorates Callback subclasses, got {cls!r}"
            )
        CALLBACKS.register(name, cls, replace=replace)
        return cls

    return decorate


def list_callbacks() -> dict[str, type[Callback]]:
    """Every registered kind, sorted by name (built-ins and entry points included)."""
    return CALLBACKS.all()


def get_callback(kind: str, *, place: str | Path = ()) -> type[Callback]:
    """The class registered under ``kind``; :class:`ConfigError` names close kinds."""
    return CALLBACKS.get(kind, place=place)


def build_callbacks(specs: Iterable[Any], *, place: str | Path = "callbacks") -> list[Callback]:
    """Build callbacks from specs: ``CallbackSpec``, ``{kind, params, isolation}`` dicts
    (``isolation`` optional), or any object with ``kind`` and ``params``. Every spec
    is validated before any is built. Each callback's ``built_from`` is set to
    ``(kind, params)``, and a given ``isolation`` to the instance.

    Raises :class:`ConfigError` (a :class:`PlacedConfigError`) like
    ``callbacks[1].params.patiense (early_stopping): unknown field 'patiense' —
    did you mean 'patience'?``.
    """
    return CALLBACKS.build(specs, place=place)
