"""The callback registry: ``@register_callback``, ``build_callbacks``, ``CallbackSpec``.

A registered class has ``name`` and, usually, a ``Config`` ClassVar: a msgspec
Struct with ``forbid_unknown_fields=True`` whose fields are the constructor's
keyword arguments. ``build_callbacks`` validates each spec's ``params``
against it before constructing, so a typo fails before the run starts, with
the place and the likely name. Third-party packages register through the
entry-point group ``evsys_async.callbacks`` (loaded on first lookup).
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any, TypeVar

import msgspec

from ..errors import ConfigError
from .base import Callback

__all__ = [
    "CallbackSpec",
    "build_callbacks",
    "get_callback",
    "list_callbacks",
    "register_callback",
    "validate_params",
]

ENTRY_POINT_GROUP = "evsys_async.callbacks"

_REGISTRY: dict[str, type[Callback]] = {}
_entry_points_loaded = False

C = TypeVar("C", bound=type[Callback])


class CallbackSpec(msgspec.Struct, forbid_unknown_fields=True):
    """``{kind, params}``: which registered callback to build, with what arguments."""

    kind: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


def register_callback(name: str, *, replace: bool = False) -> Callable[[C], C]:
    """Class decorator: register a :class:`Callback` subclass under ``name``.

    Registering the same class (same qualified name) again replaces it; a
    different class under a taken name raises :class:`ConfigError` unless
    ``replace=True``.
    """

    def decorate(cls: C) -> C:
        if not (isinstance(cls, type) and issubclass(cls, Callback)):
            raise TypeError(
                f"@register_callback({name!r}) decorates Callback subclasses, got {cls!r}"
            )
        old = _REGISTRY.get(name)
        if old is not None and not replace and _qualname(old) != _qualname(cls):
            raise ConfigError(
                f"callback kind {name!r} is already registered to {_qualname(old)}; "
                f"pick another name or pass replace=True to override it with {_qualname(cls)}"
            )
        config = getattr(cls, "Config", None)
        if config is not None and not (
            isinstance(config, type) and issubclass(config, msgspec.Struct)
        ):
            raise TypeError(f"{cls.__name__}.Config must be a msgspec.Struct, got {config!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from . import _builtins  # noqa: F401 - registers the built-ins

    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            raise ConfigError(
                f"entry point {ep.name!r} = {ep.value!r} in group {ENTRY_POINT_GROUP!r} "
                f"failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        if isinstance(obj, type) and issubclass(obj, Callback) and ep.name not in _REGISTRY:
            register_callback(ep.name)(obj)


def list_callbacks() -> dict[str, type[Callback]]:
    """Every registered kind, sorted by name (built-ins and entry points included)."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_callback(kind: str, *, place: str = "") -> type[Callback]:
    """The class registered under ``kind``; :class:`ConfigError` names close kinds."""
    _load_entry_points()
    try:
        return _REGISTRY[kind]
    except KeyError:
        pass
    known = sorted(_REGISTRY)
    close = difflib.get_close_matches(kind, known, n=1)
    hint = f" — did you mean {close[0]!r}?" if close else ""
    prefix = f"{place}: " if place else ""
    raise ConfigError(
        f"{prefix}no callback kind {kind!r}{hint} Known kinds: {', '.join(known)}"
    ) from None


def validate_params(cls: type[Callback], params: Mapping[str, Any], place: str) -> dict[str, Any]:
    """Check ``params`` against ``cls.Config`` (or its ``__init__``); return the fields.

    Raises :class:`ConfigError` naming ``place``, the field and the fix.
    """
    config = getattr(cls, "Config", None)
    if not isinstance(params, Mapping):
        raise ConfigError(f"{place}.params: expected a mapping, got {type(params).__name__}")
    if config is None:
        return _check_init(cls, dict(params), place)
    fields = [f.name for f in msgspec.structs.fields(config)]
    try:
        value = msgspec.convert(dict(params), config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(str(exc), fields, place, cls)) from None
    return {f: getattr(value, f) for f in fields}


def _explain(msg: str, fields: list[str], place: str, cls: type) -> str:
    unknown = re.match(r"Object contains unknown field `(.+?)`", msg)
    if unknown:
        name = unknown.group(1)
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f" — did you mean {close[0]!r}?" if close else f" Known fields: {', '.join(fields)}"
        return f"{place}: unknown field {name!r}{hint}"
    missing = re.match(r"Object missing required field `(.+?)`", msg)
    if missing:
        return f"{place}: missing required field {missing.group(1)!r} for {cls.__name__}"
    where = re.search(r" - at `\$\.(.+?)`", msg)
    if where:
        field = where.group(1)
        return f"{place}.{field}: {msg[: where.start()]}"
    return f"{place}: {msg}"


def _check_init(cls: type, params: dict[str, Any], place: str) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)  # type: ignore[misc]
    accepted = [p for p in sig.parameters if p != "self"]
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return params
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" — did you mean {close[0]!r}?" if close else f" Known: {', '.join(accepted)}"
            raise ConfigError(f"{place}: unknown field {key!r}{hint}")
    try:
        sig.bind(None, **params)
    except TypeError as exc:
        raise ConfigError(f"{place}: {exc}") from None
    return params


def _spec_of(spec: Any, place: str) -> tuple[str, Mapping[str, Any]]:
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"kind", "params"}
        if unknown:
            raise ConfigError(
                f"{place}: unknown key(s) {sorted(unknown)}; "
                "a callback spec has only 'kind' and 'params'"
            )
        if "kind" not in spec:
            raise ConfigError(f"{place}: missing 'kind' (e.g. kind: csv_metrics)")
        return spec["kind"], spec.get("params") or {}
    kind = getattr(spec, "kind", None)
    if kind is None:
        raise ConfigError(
            f"{place}: expected {{kind, params}} or a CallbackSpec, got {type(spec).__name__}"
        )
    return kind, getattr(spec, "params", None) or {}


def build_callbacks(specs: Iterable[Any], *, place: str = "callbacks") -> list[Callback]:
    """Build callbacks from specs: ``CallbackSpec``, ``{kind, params}`` dicts, or any
    object with ``kind`` and ``params``. Every spec is validated before any is built.

    Raises :class:`ConfigError` like
    ``callbacks[1] (early_stopping): unknown field 'patiense' — did you mean 'patience'?``.
    """
    checked: list[tuple[type[Callback], dict[str, Any], str]] = []
    for i, spec in enumerate(specs):
        where = f"{place}[{i}]"
        kind, params = _spec_of(spec, where)
        if not isinstance(kind, str):
            raise ConfigError(f"{where}.kind: expected a string, got {kind!r}")
        cls = get_callback(kind, place=where)
        fields = validate_params(cls, params, f"{where} ({kind})")
        checked.append((cls, fields, where))
    built: list[Callback] = []
    for cls, fields, where in checked:
        try:
            built.append(cls(**fields))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where} ({cls.name}): {exc}") from exc
    return built
