"""Params: checking a spec's ``params`` against a class, and explaining what is wrong.

:func:`validate_params` checks the params of one ``{kind, params}`` spec
against the class's ``Config`` (a msgspec Struct with
``forbid_unknown_fields``) or, without one, its ``__init__`` signature;
:func:`explain_validation` turns msgspec's ``ValidationError`` text into a
:class:`~evsys_async.errors.PlacedConfigError` at the place inside the
config. Every error names the place, the problem and, where one is close,
the likely name::

    callbacks[1].params.patiense (early_stopping): unknown field 'patiense'
        — did you mean 'patience'?

Pure functions: nothing here imports user code, blocks or keeps state. The
kind registries (``kinds.py``) and the config loader use them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import msgspec

from ..errors import ConfigPath, PlacedConfigError, did_you_mean, format_path

__all__ = ["as_path", "explain_validation", "seen_value", "validate_params"]

Path = ConfigPath


def as_path(place: str | Path) -> Path:
    """A place given as a string (``"callbacks"``) or a path, as a path."""
    return (place,) if isinstance(place, str) else tuple(place)


def validate_params(
    cls: type, params: object, place: str | Path, *, kind: str | None = None
) -> dict[str, Any]:
    """Check ``params`` against ``cls.Config`` (or ``cls.__init__``); return the fields.

    ``place`` is where the params sit (``"callbacks[1]"`` or a path tuple);
    errors name ``<place>.params.<field>``. Raises :class:`PlacedConfigError`
    with the field, the expected type and the value seen, or the close name.
    """
    base = (*as_path(place), "params")
    if not isinstance(params, Mapping):
        raise PlacedConfigError(
            base, f"expected a mapping of parameters, got {seen_value(params)}", kind=kind
        )
    config = getattr(cls, "Config", None)
    if config is None:
        return _check_init(cls, dict(params), base, kind)
    fields = [f.name for f in msgspec.structs.fields(config)]
    try:
        value = msgspec.convert(dict(params), config, strict=False)
    except msgspec.ValidationError as exc:
        raise explain_validation(str(exc), config, params, base, kind=kind) from None
    return {f: getattr(value, f) for f in fields}


def seen_value(value: object) -> str:
    """``int 5``, ``str 'abc'``: a value's type and its repr, cut to 60 characters,
    as error messages show what they got."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


_SEGMENT = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]")


def _msgspec_path(text: str) -> Path:
    """``"$.keys[0]"`` -> ``("keys", 0)``."""
    return tuple(
        m.group(1) if m.group(1) is not None else int(m.group(2))
        for m in _SEGMENT.finditer(text.removeprefix("$"))
    )


def _lookup(data: Any, path: Path) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _info_at(info: Any, path: Path) -> Any:
    """The msgspec type info found by walking ``path`` into ``info`` (None if lost)."""
    for part in path:
        if isinstance(info, msgspec.inspect.UnionType):
            for member in info.types:
                found = _info_at(member, (part,))
                if found is not None:
                    info = found
                    break
            else:
                return None
            continue
        if isinstance(info, msgspec.inspect.StructType) and isinstance(part, str):
            info = next((f.type for f in info.fields if f.name == part), None)
        elif isinstance(info, msgspec.inspect.ListType | msgspec.inspect.VarTupleType) and (
            isinstance(part, int)
        ):
            info = info.item_type
        elif isinstance(info, msgspec.inspect.DictType):
            info = info.value_type
        else:
            return None
        if info is None:
            return None
    return info


def _fields_of(info: Any) -> list[str]:
    if isinstance(info, msgspec.inspect.StructType):
        return [f.name for f in info.fields]
    if isinstance(info, msgspec.inspect.UnionType):
        return [name for member in info.types for name in _fields_of(member)]
    return []


def explain_validation(
    msg: str, tp: type, data: object, base: Path = (), *, kind: str | None = None
) -> PlacedConfigError:
    """Turn msgspec's ``ValidationError`` text for ``convert(data, tp)`` into a
    :class:`PlacedConfigError` at ``base + <msgspec path>``: the close name for
    an unknown field, the expected type and the value seen for a wrong one."""
    where = re.search(r" - at `(\$[^`]*)`", msg)
    inner = _msgspec_path(where.group(1)) if where else ()
    text = (msg[: where.start()] if where else msg).rstrip()
    root = msgspec.inspect.type_info(tp)
    info = _info_at(root, inner)
    owner = getattr(tp, "__qualname__", str(tp)).removesuffix(".Config")
    unknown = re.match(r"Object contains unknown field `(.+?)`", text)
    if unknown:
        name = unknown.group(1)
        fields = _fields_of(info)
        hint = did_you_mean(name, fields, f"; known fields: {', '.join(fields) or '(none)'}")
        return PlacedConfigError((*base, *inner, name), f"unknown field {name!r}{hint}", kind=kind)
    missing = re.match(r"Object missing required field `(.+?)`", text)
    if missing:
        name = missing.group(1)
        what = owner if not inner else format_path(inner)
        return PlacedConfigError(
            (*base, *inner), f"missing required field {name!r} ({what} needs it)", kind=kind
        )
    seen = _lookup(data, inner)
    expected = re.match(r"Expected `(.+?)`, got `(.+?)`", text)
    if expected:
        detail = f"expected {expected.group(1)}, got {seen_value(seen)}"
    elif _literal(info) is not None:
        choices = ", ".join(repr(v) for v in _literal(info).values)
        detail = f"expected one of {choices}, got {seen_value(seen)}"
    else:
        detail = text[:1].lower() + text[1:] + f", got {seen_value(seen)}"
    return PlacedConfigError((*base, *inner), detail, kind=kind)


def _literal(info: Any) -> Any:
    """The ``Literal`` in ``info`` (also inside ``Literal[...] | None``), or None."""
    if isinstance(info, msgspec.inspect.LiteralType):
        return info
    if isinstance(info, msgspec.inspect.UnionType):
        return next((t for t in info.types if isinstance(t, msgspec.inspect.LiteralType)), None)
    return None


def _check_init(cls: type, params: dict[str, Any], base: Path, kind: str | None) -> dict[str, Any]:
    sig = inspect.signature(cls.__init__)  # type: ignore[misc]
    accepted = [p for p in sig.parameters if p != "self"]
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return params
    for key in params:
        if key not in accepted:
            hint = did_you_mean(key, accepted, f"; known fields: {', '.join(accepted) or '(none)'}")
            raise PlacedConfigError((*base, key), f"unknown field {key!r}{hint}", kind=kind)
    try:
        sig.bind(None, **params)
    except TypeError as exc:
        raise PlacedConfigError(base, str(exc), kind=kind) from None
    return params
