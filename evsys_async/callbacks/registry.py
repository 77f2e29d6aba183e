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
first needed, so a broken plug-in fails only the configs that name it.

:class:`KindRegistry` is the machinery, shared with the evaluator registry
(``evaluators/base.py``). Its errors are :class:`PlacedConfigError`, a
:class:`ConfigError` that also carries the place as a path
(``("callbacks", 1, "params", "patiense")``) so that a config loader can map
it to a file and line.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from typing import Any, Generic, TypeVar

import msgspec

from .._log import get_logger
from ..errors import ConfigError, MissingExtraError, describe, did_you_mean
from .base import Callback

__all__ = [
    "ENTRY_POINT_GROUP",
    "CallbackSpec",
    "KindRegistry",
    "PlacedConfigError",
    "PlacedMissingExtraError",
    "build_callbacks",
    "explain_validation",
    "format_path",
    "get_callback",
    "list_callbacks",
    "register_callback",
    "validate_params",
]

_log = get_logger()

ENTRY_POINT_GROUP = "evsys_async.callbacks"

Path = tuple[str | int, ...]
K = TypeVar("K", bound=type)
C = TypeVar("C", bound=type[Callback])


class PlacedConfigError(ConfigError):
    """A :class:`ConfigError` that knows where it happened.

    ``path`` is the place inside the config (``("callbacks", 1, "params",
    "patiense")``), ``detail`` the problem and fix without the place; the
    message is ``"<path> (<kind>): <detail>"``.
    """

    def __init__(self, path: Path, detail: str, *, kind: str | None = None) -> None:
        self.path = path
        self.detail = detail
        self.kind = kind
        where = format_path(path)
        label = f" ({kind})" if kind else ""
        super().__init__(f"{where}{label}: {detail}" if where else f"{detail}")


class PlacedMissingExtraError(MissingExtraError):
    """A :class:`MissingExtraError` raised while building a spec, with the spec's place.

    The message is the extra's own (it names the install command); ``place``
    and ``kind`` let a config loader put the file, line and place in front of it.
    """

    def __init__(self, place: Path, detail: str, *, kind: str | None = None) -> None:
        self.place = place
        self.detail = detail
        self.kind = kind
        super().__init__(detail)


def format_path(path: Sequence[str | int]) -> str:
    """``("callbacks", 1, "params", "x")`` -> ``"callbacks[1].params.x"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _as_path(place: str | Path) -> Path:
    return (place,) if isinstance(place, str) else tuple(place)


class CallbackSpec(msgspec.Struct, forbid_unknown_fields=True):
    """``{kind, params}``: which registered callback to build, with what arguments."""

    kind: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


# -- params -----------------------------------------------------------------------


def validate_params(
    cls: type, params: Any, place: str | Path, *, kind: str | None = None
) -> dict[str, Any]:
    """Check ``params`` against ``cls.Config`` (or ``cls.__init__``); return the fields.

    ``place`` is where the params sit (``"callbacks[1]"`` or a path tuple);
    errors name ``<place>.params.<field>``. Raises :class:`PlacedConfigError`
    with the field, the expected type and the value seen, or the close name.
    """
    base = (*_as_path(place), "params")
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
    elif isinstance(info, msgspec.inspect.LiteralType):
        choices = ", ".join(repr(v) for v in info.values)
        detail = f"expected one of {choices}, got {_seen(seen)}"
    else:
        detail = text[:1].lower() + text[1:] + f", got {_seen(seen)}"
    return PlacedConfigError((*base, *inner), detail, kind=kind)


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
    entry-point group third-party packages register under.
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
    ) -> None:
        self.noun = noun
        self.group = group
        self._check = check
        self._builtins = builtins
        self._lazy = dict(lazy or {})
        self._name_attr = name_attr
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
        path = _as_path(place)
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
        base = _as_path(place)
        if isinstance(specs, str | bytes | Mapping) or not isinstance(specs, Iterable):
            raise PlacedConfigError(
                base, f"expected a list of {{kind, params}} specs, got {_seen(specs)}"
            )
        checked: list[tuple[K, dict[str, Any], Path, str]] = []
        for i, spec in enumerate(specs):
            where = (*base, i)
            kind, params = self._spec_of(spec, where)
            cls = self.get(kind, place=where)
            checked.append((cls, validate_params(cls, params, where, kind=kind), where, kind))
        built: list[Any] = []
        for cls, fields, where, kind in checked:
            try:
                built.append(cls(**fields))
            except (TypeError, ValueError) as exc:
                raise PlacedConfigError((*where, "params"), str(exc), kind=kind) from exc
            except MissingExtraError as exc:
                raise PlacedMissingExtraError(where, str(exc), kind=kind) from None
        return built

    def _spec_of(self, spec: Any, where: Path) -> tuple[str, Any]:
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - {"kind", "params"})
            if unknown:
                hint = did_you_mean(str(unknown[0]), ["kind", "params"])
                raise PlacedConfigError(
                    (*where, unknown[0]),
                    f"unknown key {unknown[0]!r}{hint} A {self.noun} spec has only "
                    "'kind' and 'params'",
                )
            if "kind" not in spec:
                raise PlacedConfigError(where, f"missing 'kind' (e.g. kind: {self._example()})")
            kind, params = spec["kind"], spec.get("params")
        else:
            kind = getattr(spec, "kind", None)
            if kind is None:
                raise PlacedConfigError(
                    where, f"expected {{kind, params}} or a spec object, got {_seen(spec)}"
                )
            params = getattr(spec, "params", None)
        if not isinstance(kind, str):
            raise PlacedConfigError((*where, "kind"), f"expected a string, got {_seen(kind)}")
        return kind, {} if params is None else params

    def _example(self) -> str:
        known = self.known()
        return known[0] if known else "..."


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# -- callbacks -----------------------------------------------------------------------


def _check_callback(cls: type) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise TypeError(f"a callback kind must be a Callback subclass, got {cls!r}")
    config = getattr(cls, "Config", None)
    if config is not None and not (isinstance(config, type) and issubclass(config, msgspec.Struct)):
        raise TypeError(f"{cls.__name__}.Config must be a msgspec.Struct, got {config!r}")


def _import_builtins() -> None:
    from . import _builtins  # noqa: F401 - each built-in module registers itself


CALLBACKS: KindRegistry[type[Callback]] = KindRegistry(
    "callback", group=ENTRY_POINT_GROUP, check=_check_callback, builtins=_import_builtins
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
    """Build callbacks from specs: ``CallbackSpec``, ``{kind, params}`` dicts, or any
    object with ``kind`` and ``params``. Every spec is validated before any is built.

    Raises :class:`ConfigError` (a :class:`PlacedConfigError`) like
    ``callbacks[1].params.patiense (early_stopping): unknown field 'patiense' —
    did you mean 'patience'?``.
    """
    return CALLBACKS.build(specs, place=place)
