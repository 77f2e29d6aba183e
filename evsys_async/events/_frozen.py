"""Read-only dicts and lists: what mappings inside events become.

One event object reaches every subscriber, in many tasks and threads. A
frozen msgspec Struct stops reassigning ``event.metrics``, but not
``event.metrics["loss"] = -1``: without this, one callback's edit would reach
its siblings' files. :func:`freeze` turns dicts and lists (recursively) into
subclasses whose mutators raise ``TypeError``; they still *are* dicts and
lists, so msgspec, ``json.dumps``, pandas and users' code read them as usual,
and ``dict(metrics)`` gives a private, mutable copy.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["FrozenDict", "FrozenList", "freeze", "freeze_flat"]


def _refuse(self: object, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(
        f"this {type(self).__mro__[1].__name__} belongs to an event and is read-only "
        "(every subscriber sees the same one); copy it first: dict(metrics) / list(values)"
    )


class FrozenDict(dict[Any, Any]):
    """A ``dict`` whose mutators raise ``TypeError``."""

    __slots__ = ()
    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def copy(self) -> dict[Any, Any]:
        """A plain, mutable ``dict``."""
        return dict(self)

    def __reduce__(self) -> tuple[Any, ...]:
        # pickle/deepcopy would rebuild through __setitem__, which refuses
        return (FrozenDict, (dict(self),))


class FrozenList(list[Any]):
    """A ``list`` whose mutators raise ``TypeError``."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = remove = pop = clear = sort = reverse = _refuse

    def copy(self) -> list[Any]:
        """A plain, mutable ``list``."""
        return list(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenList, (list(self),))


def freeze(value: Any) -> Any:
    """``value`` with every dict and list in it read-only; already frozen parts and
    other values are returned as they are (no copy)."""
    cls = type(value)
    if cls is dict:
        for v in value.values():
            if type(v) in _MUTABLE:
                return FrozenDict({k: freeze(v) for k, v in value.items()})
        return FrozenDict(value)
    if cls is list:
        return FrozenList([freeze(v) for v in value])
    return value


def freeze_flat(value: Any) -> Any:
    """:func:`freeze` for a mapping whose values are scalars by type (``metrics``)."""
    return FrozenDict(value) if type(value) is dict else freeze(value)


_MUTABLE = frozenset({dict, list})
