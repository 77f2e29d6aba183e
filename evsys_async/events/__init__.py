# msgspec inherits frozen=True to subclasses; mypy's dataclass_transform model does not know.
# mypy: disable-error-code="misc"
"""Typed events, the envelope that numbers them, and their codec.

Every event is a frozen, keyword-only, tagged msgspec Struct: cheap to build
(~0.2 µs), immutable (safe to hand to many subscribers and threads) and
round-trippable through JSON and msgpack. The base :class:`Event` carries a
wall-clock ``ts``, the ``run_key`` of the run that published it and the
``rank`` of the process that published it (0 unless training spans several
processes), all with defaults, so a user subclass may add required fields::

    class LossSpike(ev.events.Event):
        step: int
        loss: float

Subclasses register themselves when defined; the codec decodes every known
event type as one tagged union (the tag is the class name unless the class
says ``tag="..."``). Live objects never travel in events: the step's batch
and the loop's artifacts reach hooks out of band (the callback adapter hands
them over).

Level-like events (``StepEnded``, ``SubscriberLagged``, a user class with
``coalesce = True``) may be coalesced by a ``Latest`` subscriber.
"""

from __future__ import annotations

import time
import typing
from collections.abc import Iterable
from typing import Any, ClassVar, TypeAlias

import msgspec

from .._util.jsonl import non_finite_as_strings
from ..errors import EventDecodeError, did_you_mean
from ._frozen import FrozenDict, freeze

__all__ = [
    "BenchmarkEvaluated",
    "CallbackFailed",
    "CheckpointSaved",
    "Envelope",
    "EvalEnded",
    "EvalFailed",
    "Event",
    "ExperimentEnded",
    "ExperimentStarted",
    "GroupStarted",
    "RunEnded",
    "RunStarted",
    "StepEnded",
    "StopRequested",
    "SubscriberLagged",
    "TrainEnded",
    "TrainStarted",
    "UnknownEvent",
    "decode",
    "decode_envelope",
    "encode",
    "event_type",
    "event_types",
]

Metrics: TypeAlias = dict[str, float]

_SUBCLASSES: list[type[Event]] = []


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


# -- loop scope -------------------------------------------------------------------


class TrainStarted(Event, kw_only=True):
    """A run (or one rank of it) began. ``world_size`` is how many ranks the run has:
    a consumer following every rank ends after that many ``TrainEnded``."""

    num_steps: int
    start_step: int = 0
    output_dir: str = ""
    world_size: int = 1


class StepEnded(Event, kw_only=True):
    """A step finished. ``step`` is 0-based; ``metrics`` are plain floats."""

    step: int
    num_steps: int
    metrics: Metrics = msgspec.field(default_factory=dict)

    coalesce: ClassVar[bool] = True


class EvalEnded(Event, kw_only=True):
    step: int
    eval_name: str
    metrics: Metrics = msgspec.field(default_factory=dict)


class EvalFailed(Event, kw_only=True):
    step: int
    eval_name: str
    error: str


class CheckpointSaved(Event, kw_only=True):
    step: int
    name: str
    path: str | None = None
    row: dict[str, Any] = msgspec.field(default_factory=dict)


class StopRequested(Event, kw_only=True):
    step: int
    reason: str | None = None
    source: str = ""


class TrainEnded(Event, kw_only=True):
    """The run ended. ``status``: completed | stopped | failed | cancelled.

    With several ranks, ``stop_rank`` is the rank whose request stopped every
    rank (or the rank that failed or died), ``None`` when no rank asked.
    """

    status: str
    steps_completed: int
    num_steps: int
    stop_reason: str | None = None
    train_seconds: float = 0.0
    error: str | None = None
    stop_rank: int | None = None


# -- experiment scope -----------------------------------------------------------


class ExperimentStarted(Event, kw_only=True):
    name: str


class GroupStarted(Event, kw_only=True):
    group_name: str


class RunStarted(Event, kw_only=True):
    arm: str
    repeat: int = 0


class BenchmarkEvaluated(Event, kw_only=True):
    step: int | None = None
    eval_result: dict[str, Any] = msgspec.field(default_factory=dict)
    predictions: list[Any] = msgspec.field(default_factory=list)


class RunEnded(Event, kw_only=True):
    arm: str
    result: dict[str, Any] = msgspec.field(default_factory=dict)


class ExperimentEnded(Event, kw_only=True):
    result: dict[str, Any] = msgspec.field(default_factory=dict)


# -- runtime health -------------------------------------------------------------


class CallbackFailed(Event, kw_only=True):
    """A subscriber's handler raised or timed out (``error`` says which, in one line).

    ``traceback`` is the traceback text of a failure in a subscriber's own
    process (``isolation="process"``), whose frames are not in this one; empty
    otherwise (an in-process failure's traceback is on its WARNING record).
    """

    subscriber: str
    hook: str
    event_type: str
    error: str
    traceback: str = ""


class SubscriberLagged(Event, kw_only=True):
    """A subscriber fell behind: ``pending`` waiting, ``dropped`` by its policy so far."""

    subscriber: str
    pending: int
    dropped: int = 0

    coalesce: ClassVar[bool] = True


# -- events from elsewhere -------------------------------------------------------


class UnknownEvent(Event, kw_only=True):
    """An event whose class is not defined in this process.

    Decoding with ``keep_unknown=True`` (replay and :func:`evsys_async.read_events`
    do) turns an event of an unknown type — a user's custom event whose class
    is not importable here — into this record instead of an error:
    ``event_type`` is its type name (its tag), ``fields`` its own fields as
    plain JSON values; ``ts`` and ``run_key`` are its own. Encoding it writes
    the original event back (``{"type": event_type, ...fields}``), so it
    round-trips through event logs and streams unchanged. Callbacks get it in
    ``on_event``.
    """

    event_type: str
    fields: dict[str, Any] = msgspec.field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        """The event as it was encoded: ``{"type": event_type, "ts", "run_key", ...fields}``."""
        record: dict[str, Any] = {"type": self.event_type}
        for name in Event.__struct_fields__:  # ts, run_key and any later base field
            record[name] = getattr(self, name)
        record.update(self.fields)
        return record


# -- envelope and codec ---------------------------------------------------------


class Envelope(msgspec.Struct, frozen=True):
    """An event with the number the bus gave it.

    ``(bus_id, seq)`` is unique across buses, resumes and ranks; every encoded
    form (JSON lines, Redis) is an envelope.
    """

    bus_id: str
    seq: int
    event: Event


class _WireEnvelope(msgspec.Struct, frozen=True):
    bus_id: str
    seq: int
    event: msgspec.Raw


_codec_cache: tuple[int, Any, Any, dict[str, type[Event]]] | None = None


def event_types() -> dict[str, type[Event]]:
    """Every known event type by tag: the built-ins and user subclasses defined so far.

    Raises :class:`EventDecodeError` when two classes share a tag; the fix is
    ``tag="..."`` on one of them.
    """
    return _codec()[3]


def _codec() -> tuple[int, Any, Any, dict[str, type[Event]]]:
    global _codec_cache
    n = len(_SUBCLASSES)
    if _codec_cache is not None and _codec_cache[0] == n:
        return _codec_cache
    by_tag: dict[str, type[Event]] = {"Event": Event}
    for cls in _SUBCLASSES:
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str)
        other = by_tag.get(tag)
        if other is not None and _same_name(other, cls):
            pass  # the class was defined again (a re-run notebook cell): the newest wins
        elif other is not None and other is not cls:
            raise EventDecodeError(
                f"event classes {other.__module__}.{other.__qualname__} and "
                f"{cls.__module__}.{cls.__qualname__} share the tag {tag!r}; give one of "
                f'them its own tag: class {cls.__name__}(Event, tag="...")'
            )
        by_tag[tag] = cls
    union: Any = _union(by_tag.values())
    _codec_cache = (
        n,
        # strict=False: JSON has no NaN/Infinity, so encode() writes them as strings
        (msgspec.json.Decoder(union, strict=False), msgspec.msgpack.Decoder(union)),
        (msgspec.json.Decoder(_WireEnvelope), msgspec.msgpack.Decoder(_WireEnvelope)),
        by_tag,
    )
    return _codec_cache


def _same_name(a: type, b: type) -> bool:
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _union(types: Iterable[type[Event]]) -> Any:
    result: Any = None
    for t in types:
        result = t if result is None else result | t
    return result


def event_type(name: str) -> type[Event]:
    """The event class for a tag (``"StepEnded"``); a clear error names the close ones."""
    types = event_types()
    try:
        return types[name]
    except KeyError:
        raise EventDecodeError(f"no event type {name!r}{did_you_mean(name, types)}") from None


_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def encode(obj: Event | Envelope, *, format: str = "json") -> bytes:
    """Encode an event or an envelope as JSON (one line, no newline) or msgpack.

    An :class:`UnknownEvent` is written as the event it stands for.
    """
    if type(obj) is UnknownEvent or (type(obj) is Envelope and type(obj.event) is UnknownEvent):
        obj = _with_record(obj)  # type: ignore[assignment]
    if format == "json":
        data = _json_encoder.encode(obj)
        if b"null" in data:  # msgspec writes NaN and +-inf as null: keep them
            fixed = non_finite_as_strings(msgspec.to_builtins(obj))
            if fixed is not None:
                data = _json_encoder.encode(fixed)
        return data
    if format == "msgpack":
        return _msgpack_encoder.encode(obj)
    raise ValueError(f"format must be 'json' or 'msgpack', got {format!r}")


def _with_record(obj: Any) -> dict[str, Any]:
    if isinstance(obj, Envelope):
        event: UnknownEvent = obj.event  # type: ignore[assignment]
        return {"bus_id": obj.bus_id, "seq": obj.seq, "event": event.as_record()}
    return obj.as_record()  # type: ignore[no-any-return]


def _unknown(raw: Any, format: str) -> UnknownEvent | None:
    """``raw`` (an encoded event) as an :class:`UnknownEvent` if it is an object whose
    ``type`` names no known event type; ``None`` otherwise (it is malformed)."""
    try:
        data = msgspec.json.decode(raw) if format == "json" else msgspec.msgpack.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(data, dict):
        return None
    tag = data.get("type")
    if not isinstance(tag, str) or tag in event_types():
        return None
    base = {name: data.pop(name) for name in Event.__struct_fields__ if name in data}
    del data["type"]
    try:
        return msgspec.convert(
            {**base, "type": "UnknownEvent", "event_type": tag, "fields": data}, UnknownEvent
        )
    except msgspec.ValidationError:
        return None


def _index(format: str) -> int:
    if format == "json":
        return 0
    if format == "msgpack":
        return 1
    raise ValueError(f"format must be 'json' or 'msgpack', got {format!r}")


def decode(data: bytes | str, *, format: str = "json", keep_unknown: bool = False) -> Event:
    """Decode one event of any known type; raises :class:`EventDecodeError` with the place.

    With ``keep_unknown`` an event of a type not defined here comes back as an
    :class:`UnknownEvent` instead of an error.
    """
    dec = _codec()[1][_index(format)]
    try:
        event: Event = dec.decode(data)
    except msgspec.DecodeError as exc:
        unknown = _unknown(data, format) if keep_unknown else None
        if unknown is not None:
            return unknown
        raise EventDecodeError(f"malformed event: {exc}") from None
    return event


def decode_envelope(
    data: bytes | str, *, format: str = "json", keep_unknown: bool = False
) -> Envelope:
    """Decode one envelope (``{"bus_id", "seq", "event"}``); errors name the place.

    With ``keep_unknown`` an event of a type not defined here comes back as an
    :class:`UnknownEvent` instead of an error.
    """
    _, events, wire, _ = _codec()
    i = _index(format)
    try:
        raw = wire[i].decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"malformed envelope: {exc}") from None
    try:
        event = events[i].decode(raw.event)
    except msgspec.DecodeError as exc:
        unknown = _unknown(raw.event, format) if keep_unknown else None
        if unknown is not None:
            return Envelope(bus_id=raw.bus_id, seq=raw.seq, event=unknown)
        msg = str(exc)
        msg = msg.replace("`$", "`$.event") if " - at `$" in msg else f"{msg} - at `$.event`"
        raise EventDecodeError(f"malformed envelope: {msg}") from None
    return Envelope(bus_id=raw.bus_id, seq=raw.seq, event=event)
