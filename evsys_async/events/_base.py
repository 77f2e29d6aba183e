# msgspec inherits frozen=True to subclasses; mypy's dataclass_transform model does not know.
# mypy: disable-error-code="misc"
"""The base :class:`Event`, its per-class specialisation, and the :class:`Envelope`.

What this module promises:

* every subclass of :class:`Event` registers itself when it is defined
  (:func:`event_classes` lists them, in definition order: the codec reads it);
* every event is frozen down to its dicts and lists once it is built or
  decoded: each subclass gets a ``__post_init__`` written for its own fields
  at class creation (:func:`_specialize`), so the loop's per-step
  ``StepEnded`` pays one type check per container field and nothing else.

The annotations here are real objects, not strings (no ``from __future__
import annotations``): the public classes say they live in
``evsys_async.events`` (their ``__module__``), and msgspec resolves string
annotations in the namespace ``__module__`` names.
"""

import time
import typing
from typing import Any, ClassVar

import msgspec

from ._frozen import FrozenDict, freeze

__all__ = ["PUBLIC_MODULE", "Envelope", "Event", "event_classes"]

#: The module the event classes say they are from (``__module__``): the public path,
#: so reprs and pickles do not name the private module that defines them.
PUBLIC_MODULE = "evsys_async.events"


class Event(msgspec.Struct, frozen=True, kw_only=True, tag=True, gc=False):
    """Base of every event. Subclass it for custom events.

    ``ts`` is the wall-clock time of creation; ``run_key`` is stamped by the
    loop that publishes it (``""`` outside a run), so one bus can carry many
    runs and subscribers can filter on it; ``rank`` is the publishing
    process's rank when training spans several processes (0 otherwise), so
    one consumer can follow every rank of a run.

    Events are data: the cycle collector does not track them (``gc=False``),
    which keeps a loop that builds one per step from paying for collections.
    An event must therefore never be part of a reference cycle (do not put an
    event, or an object that refers to it, inside itself).
    """

    ts: float = msgspec.field(default_factory=time.time)
    run_key: str = ""
    rank: int = 0

    #: A ``Latest`` subscriber replaces a pending event of this type (same
    #: run) by a newer one: the event stands for a level, not a happening.
    coalesce: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _SUBCLASSES.append(cls)
        _specialize(cls)

    def __post_init__(self) -> None:
        # Runs on construction and on decode. One event object reaches every
        # subscriber: dicts and lists in it become read-only (a ``dict`` subclass),
        # so no callback can change what its siblings see. Each subclass gets a
        # version written for its own fields (_specialize); this general one
        # serves a subclass that defines __post_init__ and calls super().
        fields = _CONTAINER_FIELDS.get(self.__class__)
        if fields is None:
            fields = _CONTAINER_FIELDS[self.__class__] = _container_fields(self.__class__)
        for name, flat in fields:
            value = getattr(self, name)
            cls = value.__class__
            if cls is dict:  # the common case, kept to a type check and one copy
                _force_setattr(self, name, FrozenDict(value) if flat else freeze(value))
            elif cls is list:
                _force_setattr(self, name, freeze(value))


#: every subclass of Event, in definition order (a re-defined class appears twice)
_SUBCLASSES: list[type[Event]] = []


def event_classes() -> list[type[Event]]:
    """Every subclass of :class:`Event` defined so far, in definition order.

    The list itself, not a copy: the codec rebuilds its tagged union when its
    length changes. Never raises.
    """
    return _SUBCLASSES


class Envelope(msgspec.Struct, frozen=True):
    """An event with the number the bus gave it.

    ``(bus_id, seq)`` is unique across buses, resumes and ranks; every encoded
    form (JSON lines, Redis) is an envelope.
    """

    bus_id: str
    seq: int
    event: Event


_force_setattr = msgspec.structs.force_setattr


def _specialize(cls: type) -> None:
    """Give ``cls`` a ``__post_init__`` written for its fields, as dataclasses write
    ``__init__``: a type check per field that may hold a dict or a list, and
    nothing at all for the others. Built once, at class creation; the loop builds
    a ``StepEnded`` every step. A class with its own ``__post_init__`` keeps it,
    and one whose annotations cannot be resolved yet keeps the general one."""
    if "__post_init__" in cls.__dict__:
        return
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference not defined yet
        return
    fields: list[tuple[str, bool]] = []
    for name, hint in hints.items():
        if typing.get_origin(hint) is ClassVar:
            continue
        try:
            info = msgspec.inspect.type_info(hint)
        except Exception:  # not a type msgspec knows: it may hold anything
            fields.append((name, False))
            continue
        if not _scalar(info):
            fields.append((name, _flat(info)))
    lines = ["def __post_init__(self):"]
    for name, flat in fields:
        copy = "FrozenDict(v)" if flat else "freeze(v)"
        lines += [
            f"    v = self.{name}",
            f"    if v.__class__ is dict: _fs(self, {name!r}, {copy})",
            f"    elif v.__class__ is list: _fs(self, {name!r}, freeze(v))",
        ]
    if not fields:
        lines.append("    pass")
    namespace: dict[str, Any] = {"FrozenDict": FrozenDict, "freeze": freeze, "_fs": _force_setattr}
    exec("\n".join(lines), namespace)  # the names are the class's own field names
    cls.__post_init__ = namespace["__post_init__"]  # type: ignore[attr-defined]
    _CONTAINER_FIELDS[cls] = tuple(fields)


#: per class, its fields that may hold a dict or a list, and whether that is a flat
#: mapping of scalars (``metrics``: no walk through the values)
_CONTAINER_FIELDS: dict[type, tuple[tuple[str, bool], ...]] = {}
_SCALARS = (
    msgspec.inspect.IntType,
    msgspec.inspect.FloatType,
    msgspec.inspect.StrType,
    msgspec.inspect.BoolType,
    msgspec.inspect.NoneType,
    msgspec.inspect.LiteralType,
)


def _scalar(t: msgspec.inspect.Type) -> bool:
    if isinstance(t, msgspec.inspect.UnionType):
        return all(_scalar(u) for u in t.types)
    return isinstance(t, _SCALARS)


def _flat(t: msgspec.inspect.Type) -> bool:
    """A mapping of scalars by type (``metrics``): frozen without a walk through it."""
    return isinstance(t, msgspec.inspect.DictType) and _scalar(t.value_type)


def _container_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """The fields of ``cls`` that may hold a dict or a list, each with whether it is
    flat (see :func:`_flat`)."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return tuple((f.name, _flat(f.type)) for f in info.fields if not _scalar(f.type))


for _public in (Event, Envelope):
    _public.__module__ = PUBLIC_MODULE
