"""Kinds: the registries that turn a config's ``{kind, params}`` into objects.

:class:`KindRegistry` maps names to classes for one family (callbacks in
``callbacks/registry.py``, evaluators in ``evaluators/base.py``): built-ins
registered by their modules, lazy built-ins, and third-party classes from an
entry-point group, each imported when its kind is first needed so a broken
plug-in fails only the configs that name it. :func:`validate_params` checks a
spec's params against the class's ``Config`` (a msgspec Struct with
``forbid_unknown_fields``) or its ``__init__``; every error is a
:class:`~evsys_async.errors.PlacedConfigError` naming the place and, where
one is close, the likely name::

    callbacks[1].params.patiense (early_stopping): unknown field 'patiense'
        — did you mean 'patience'?
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any, Generic, TypeVar

import msgspec

from ..errors import (
    ConfigError,
    ConfigPath,
    MissingExtraError,
    PlacedConfigError,
    PlacedMissingExtraError,
    describe,
    did_you_mean,
    format_path,
)
from .log import get_logger

__all__ = ["KindRegistry", "as_path", "explain_validation", "validate_params"]

_log = get_logger()

Path = ConfigPath
K = TypeVar("K", bound=type)


def as_path(place: str | Path) -> Path:
    """A place given as a string (``"callbacks"``) or a path, as a path."""
    return (place,) if isinstance(place, str) else tuple(place)


def validate_params(
    cls: type, params: Any, place: str | Path, *, kind: str | None = None
) -> dict[str, Any]:
    """Check ``params`` against ``cls.Config`` (or ``cls.__init__``); return the fields.

    ``place`` is where the params sit (``"callbacks[1]"`` or a path tuple);
    errors name ``<place>.params.<field>``. Raises :class:`PlacedConfigError`
    with the field, the expected type and the value seen, or the close name.
    """
    base = (*as_path(place), "params")
    if not isinstance(params, Mapping):
        raise PlacedConfigError(
            base, f"expected a mapping of parameters, got {_seen(params)}", kind=kind
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


def _seen(value: Any) -> str:
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
    msg: str, tp: Any, data: Any, base: Path = (), *, kind: str | None = None
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
        detail = f"expected {expected.group(1)}, got {_seen(seen)}"
    elif _literal(info) is not None:
        choices = ", ".join(repr(v) for v in _literal(info).values)
        detail = f"expected one of {choices}, got {_seen(seen)}"
    else:
        detail = text[:1].lower() + text[1:] + f", got {_seen(seen)}"
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


# -- the registry machinery --------------------------------------------------------


class KindRegistry(Generic[K]):
    """Names -> classes for one family of config ``kind``\\ s (callbacks, evaluators).

    ``check(cls)`` raises ``TypeError`` for a class that does not belong;
    ``builtins()`` is called once before the first lookup (it imports the
    built-in modules, which register themselves); ``lazy`` maps built-in
    kinds that live in modules further up the import order to
    ``"module:Class"``, imported when first looked up; ``group`` is the
    entry-point group third-party packages register under. ``options`` are
    the keys a spec may have beside ``kind`` and ``params``, each with its
    allowed values (callbacks: ``isolation``); ``on_built(obj, kind, params,
    options)`` is called for each object built.
    """

    def __init__(
        self,
        noun: str,
        *,
        group: str,
        check: Callable[[type], None],
        builtins: Callable[[], None] | None = None,
        lazy: Mapping[str, str] | None = None,
        name_attr: str = "name",
        options: Mapping[str, tuple[Any, ...]] | None = None,
        on_built: Callable[[Any, str, dict[str, Any], dict[str, Any]], None] | None = None,
    ) -> None:
        self.noun = noun
        self.group = group
        self._check = check
        self._builtins = builtins
        self._lazy = dict(lazy or {})
        self._name_attr = name_attr
        self._options = dict(options or {})
        self._on_built = on_built
        self._classes: dict[str, K] = {}
        self._entry_points: dict[str, metadata.EntryPoint] | None = None
        self._from_entry_points: set[str] = set()

    def register(self, name: str, cls: K, *, replace: bool = False) -> K:
        """Register ``cls`` under ``name``; see :func:`register_callback` for the rules."""
        self._check(cls)
        old = self._classes.get(name)
        if old is not None and not replace and _qualname(old) != _qualname(cls):
            raise ConfigError(
                f"{self.noun} kind {name!r} is already registered to {_qualname(old)}; "
                f"pick another name or pass replace=True to override it with {_qualname(cls)}"
            )
        setattr(cls, self._name_attr, name)
        self._classes[name] = cls
        return cls

    def refresh(self) -> None:
        """Read the entry-point group again (after installing a plug-in at run time);
        kinds loaded from entry points are forgotten and loaded again when named."""
        self._entry_points = None
        for name in self._from_entry_points:
            self._classes.pop(name, None)
        self._from_entry_points.clear()

    def _discover(self) -> dict[str, metadata.EntryPoint]:
        if self._entry_points is None:
            self._entry_points = {}
            if self._builtins is not None:
                self._builtins()
            for ep in metadata.entry_points(group=self.group):
                self._entry_points.setdefault(ep.name, ep)
        return self._entry_points

    def _load(self, name: str, path: Path) -> K | None:
        """Import a lazy built-in or an entry point named ``name``; None if there is none."""
        target = self._lazy.get(name)
        if target is not None:
            module, _, attr = target.partition(":")
            obj: Any = getattr(importlib.import_module(module), attr)
            origin = f"built-in {self.noun} {target!r}"
        else:
            ep = self._discover().get(name)
            if ep is None:
                return None
            origin = f"entry point {ep.name!r} = {ep.value!r} in group {self.group!r}"
            self._from_entry_points.add(name)
            try:
                obj = ep.load()
            except Exception as exc:
                raise PlacedConfigError(
                    path, f"{origin} failed to import: {describe(exc)}", kind=name
                ) from exc
        if not isinstance(obj, type):
            raise PlacedConfigError(path, f"{origin} is {obj!r}, not a class", kind=name)
        try:
            self._check(obj)
        except TypeError as exc:
            raise PlacedConfigError(path, f"{origin}: {exc}", kind=name) from None
        if self._classes.get(name) is not obj:
            self.register(name, obj)  # type: ignore[arg-type]
        return self._classes[name]

    def all(self) -> dict[str, K]:
        """Every kind, sorted by name; entry points that fail to import are skipped
        with a WARNING (looking such a kind up raises with the reason)."""
        names = set(self._discover()) | set(self._lazy) | set(self._classes)
        out: dict[str, K] = {}
        for name in sorted(names):
            try:
                out[name] = self.get(name)
            except ConfigError as exc:
                _log.warning(
                    "kind skipped: it failed to load", family=self.noun, kind=name, error=str(exc)
                )
        return out

    def known(self) -> list[str]:
        """Every kind name, without importing anything that is not loaded yet."""
        return sorted(set(self._discover()) | set(self._lazy) | set(self._classes))

    def get(self, kind: str, *, place: str | Path = ()) -> K:
        """The class registered under ``kind``; :class:`PlacedConfigError` names close kinds."""
        path = as_path(place)
        self._discover()
        cls = self._classes.get(kind)
        if cls is not None:
            return cls
        loaded = self._load(kind, path)
        if loaded is not None:
            return loaded
        known = self.known()
        hint = did_you_mean(kind, known, ".")
        listed = ", ".join(known) or "(none)"
        raise PlacedConfigError(
            (*path, "kind") if path else path,
            f"no {self.noun} kind {kind!r}{hint} Known kinds: {listed}",
        )

    def build(self, specs: Iterable[Any], *, place: str | Path) -> list[Any]:
        """Validate every spec, then construct each: ``cls(**fields)``."""
        base = as_path(place)
        if isinstance(specs, str | bytes | Mapping) or not isinstance(specs, Iterable):
            raise PlacedConfigError(
                base, f"expected a list of {{kind, params}} specs, got {_seen(specs)}"
            )
        checked: list[tuple[K, dict[str, Any], Path, str, Any, dict[str, Any]]] = []
        for i, spec in enumerate(specs):
            where = (*base, i)
            kind, params, options = self._spec_of(spec, where)
            cls = self.get(kind, place=where)
            fields = validate_params(cls, params, where, kind=kind)
            checked.append((cls, fields, where, kind, params, options))
        built: list[Any] = []
        for cls, fields, where, kind, params, options in checked:
            try:
                obj = cls(**fields)
            except (TypeError, ValueError) as exc:
                raise PlacedConfigError((*where, "params"), str(exc), kind=kind) from exc
            except MissingExtraError as exc:
                raise PlacedMissingExtraError(where, str(exc), kind=kind) from None
            if self._on_built is not None:
                self._on_built(obj, kind, dict(params), options)
            built.append(obj)
        return built

    def _spec_of(self, spec: Any, where: Path) -> tuple[str, Any, dict[str, Any]]:
        """``(kind, params, options)`` of one spec; the options given, checked."""
        keys = ["kind", "params", *self._options]
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(keys))
            if unknown:
                hint = did_you_mean(str(unknown[0]), keys)
                listed = ", ".join(repr(k) for k in keys)
                raise PlacedConfigError(
                    (*where, unknown[0]),
                    f"unknown key {unknown[0]!r}{hint} A {self.noun} spec has only {listed}",
                )
            if "kind" not in spec:
                raise PlacedConfigError(where, f"missing 'kind' (e.g. kind: {self._example()})")
            kind, params = spec["kind"], spec.get("params")
            given = {k: spec[k] for k in self._options if spec.get(k) is not None}
        else:
            kind = getattr(spec, "kind", None)
            if kind is None:
                raise PlacedConfigError(
                    where, f"expected {{kind, params}} or a spec object, got {_seen(spec)}"
                )
            params = getattr(spec, "params", None)
            given = {k: getattr(spec, k) for k in self._options if getattr(spec, k, None)}
        if not isinstance(kind, str):
            raise PlacedConfigError((*where, "kind"), f"expected a string, got {_seen(kind)}")
        for key, value in given.items():
            allowed = self._options[key]
            if value not in allowed:
                choices = ", ".join(repr(v) for v in allowed)
                raise PlacedConfigError(
                    (*where, key), f"expected one of {choices}, got {_seen(value)}", kind=kind
                )
        return kind, {} if params is None else params, given

    def _example(self) -> str:
        known = self.known()
        return known[0] if known else "..."


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
