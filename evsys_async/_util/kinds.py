"""Kinds: the registries that turn a config's ``{kind, params}`` into objects.

:class:`KindRegistry` maps names to classes for one family (callbacks in
``callbacks/registry.py``, evaluators in ``evaluators/base.py``): built-ins
registered by their modules, lazy built-ins, and third-party classes from an
entry-point group, each imported when its kind is first needed so a broken
plug-in fails only the configs that name it. A kind may also be a class's
import path, ``"package.module:Class"`` (or ``"package.module.Class"`` when no
registered kind has that name): imported as a step's path is (``imports.py``,
the same errors) and checked as a registered class is. Each spec's params are
checked by :func:`~evsys_async._util.params.validate_params` before any object
is built; every error is a :class:`~evsys_async.errors.PlacedConfigError`
naming the place and, where one is close, the likely name::

    evaluators[0].kind: no evaluator kind 'demo_acuracy' — did you mean
        'demo_accuracy'? Known kinds: demo_accuracy, http
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from importlib import metadata
from typing import Any, Generic, TypeVar

from ..errors import (
    ConfigError,
    ConfigPath,
    MissingExtraError,
    PlacedConfigError,
    PlacedMissingExtraError,
    describe,
    did_you_mean,
)
from .imports import import_target
from .log import get_logger
from .params import as_path, seen_value, validate_params

__all__ = ["KindRegistry"]

_log = get_logger()

Path = ConfigPath
K = TypeVar("K", bound=type)


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
        """The class registered under ``kind``, or the class a path names
        (``"package.module:Class"``, or ``"package.module.Class"`` when no kind has
        that name); :class:`PlacedConfigError` names close kinds, or says why the
        path did not import."""
        path = as_path(place)
        self._discover()
        cls = self._classes.get(kind)
        if cls is not None:
            return cls
        where = (*path, "kind") if path else path
        if ":" in kind:
            return self._import(kind, where)
        loaded = self._load(kind, path)
        if loaded is not None:
            return loaded
        if "." in kind.strip("."):  # "package.module.Class": tried as a path
            module, _, attr = kind.rpartition(".")
            try:
                return self._import(f"{module}:{attr}", where, shown=kind)
            except PlacedConfigError as exc:
                why = f" ({exc.detail})"
        else:
            why = ""
        known = self.known()
        hint = did_you_mean(kind, known, ".")
        listed = ", ".join(known) or "(none)"
        raise PlacedConfigError(
            where,
            f"no {self.noun} kind {kind!r}{why}{hint} Known kinds: {listed}; a class of "
            f'your own by its import path: kind: "package.module:Class"',
        )

    def _import(self, target: str, where: Path, *, shown: str | None = None) -> K:
        """The class ``"package.module:Class"`` names, checked as a registered one is."""
        obj = import_target(target, where, expected="package.module:Class")
        name = shown or target
        if not isinstance(obj, type):
            raise PlacedConfigError(
                where, f"{name!r} names {obj!r:.60} ({type(obj).__name__}), not a {self.noun} class"
            )
        try:
            self._check(obj)
        except TypeError as exc:
            raise PlacedConfigError(where, f"{name!r}: {exc}") from None
        cls: K = obj  # type: ignore[assignment]
        return cls

    def build(self, specs: Iterable[Any], *, place: str | Path) -> list[Any]:
        """Validate every spec, then construct each: ``cls(**fields)``."""
        base = as_path(place)
        if isinstance(specs, str | bytes | Mapping) or not isinstance(specs, Iterable):
            raise PlacedConfigError(
                base, f"expected a list of {{kind, params}} specs, got {seen_value(specs)}"
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
                    where, f"expected {{kind, params}} or a spec object, got {seen_value(spec)}"
                )
            params = getattr(spec, "params", None)
            given = {k: getattr(spec, k) for k in self._options if getattr(spec, k, None)}
        if not isinstance(kind, str):
            raise PlacedConfigError((*where, "kind"), f"expected a string, got {seen_value(kind)}")
        for key, value in given.items():
            allowed = self._options[key]
            if value not in allowed:
                choices = ", ".join(repr(v) for v in allowed)
                raise PlacedConfigError(
                    (*where, key), f"expected one of {choices}, got {seen_value(value)}", kind=kind
                )
        return kind, {} if params is None else params, given

    def _example(self) -> str:
        known = self.known()
        return known[0] if known else "..."


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
