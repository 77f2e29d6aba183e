# msgspec inherits frozen=True to subclasses; mypy's dataclass_transform model does not know.
# mypy: disable-error-code="misc"
"""Typed events, the envelope that numbers them, and their codec.

Every event is a frozen, keyword-only, tagged msgspec Struct: cheap to build
(~0.2 µs), immutable (safe to hand to many subscribers and threads) and
round-trippable through JSON and msgpack. The base :class:`Event` carries a
wall-clock ``ts`` and the ``run_key`` of the run that published it, both with
defaults, so a user subclass may add required fields::

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
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeAlias

import msgspec

from ._frozen import freeze, freeze_flat
from ._json import non_finite_as_strings
from .errors import EventDecodeError, did_you_mean

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
    "decode",
    "decode_envelope",
    "encode",
    "event_type",
    "event_types",
]

Metrics: TypeAlias = dict[str, float]

_SUBCLASSES: list[type[Event]] = []


class Event(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    """Base of every event. Subclass it for custom events.

    ``ts`` is the wall-clock time of creation; ``run_key`` is stamped by the
    loop that publishes it (``""`` outside a run), so one bus can carry many
    runs and subscribers can filter on it.
    """

    ts: float = msgspec.field(default_factory=time.time)
    run_key: str = ""

    #: A ``Latest`` subscriber replaces a pending event of this type (same
    #: run) by a newer one: the event stands for a level, not a happening.
    coalesce: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _SUBCLASSES.append(cls)

    def __post_init__(self) -> None:
        # Runs on construction and on decode. One event object reaches every
        # subscriber: dicts and lists in it become read-only (a ``dict`` subclass),
        # so no callback can change what its siblings see. A subclass that defines
        # __post_init__ calls super().__post_init__().
        cls = type(self)
        fields = _CONTAINER_FIELDS.get(cls)
        if fields is None:
            fields = _CONTAINER_FIELDS[cls] = _container_fields(cls)
        for name, freezer in fields:
            value = getattr(self, name)
            frozen = freezer(value)
            if frozen is not value:
                msgspec.structs.force_setattr(self, name, frozen)


_CONTAINER_FIELDS: dict[type, tuple[tuple[str, Callable[[Any], Any]], ...]] = {}
_SCALARS = (
    msgspec.inspect.IntType,
    msgspec.inspect.FloatType,
    msgspec.inspect.StrType,
    msgspec.inspect.BoolType,
    msgspec.inspect.NoneType,
    msgspec.inspect.LiteralType,
)


def _container_fields(cls: type) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    """The fields of ``cls`` that may hold a dict or a list, each with how to freeze it
    (a mapping of scalars, such as ``metrics``, needs no walk through its values)."""
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)

    def scalar(t: msgspec.inspect.Type) -> bool:
        if isinstance(t, msgspec.inspect.UnionType):
            return all(scalar(u) for u in t.types)
        return isinstance(t, _SCALARS)

    def freezer(t: msgspec.inspect.Type) -> Callable[[Any], Any]:
        flat = isinstance(t, msgspec.inspect.DictType) and scalar(t.value_type)
        return freeze_flat if flat else freeze

    return tuple((f.name, freezer(f.type)) for f in info.fields if not scalar(f.type))


# -- loop scope -------------------------------------------------------------------


class TrainStarted(Event, kw_only=True):
    num_steps: int
    start_step: int = 0
    output_dir: str = ""


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
    """The run ended. ``status``: completed | stopped | failed | cancelled."""

    status: str
    steps_completed: int
    num_steps: int
    stop_reason: str | None = None
    train_seconds: float = 0.0
    error: str | None = None


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
    """Encode an event or an envelope as JSON (one line, no newline) or msgpack."""
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


def _index(format: str) -> int:
    if format == "json":
        return 0
    if format == "msgpack":
        return 1
    raise ValueError(f"format must be 'json' or 'msgpack', got {format!r}")


def decode(data: bytes | str, *, format: str = "json") -> Event:
    """Decode one event of any known type; raises :class:`EventDecodeError` with the place."""
    dec = _codec()[1][_index(format)]
    try:
        event: Event = dec.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"malformed event: {exc}") from None
    return event


def decode_envelope(data: bytes | str, *, format: str = "json") -> Envelope:
    """Decode one envelope (``{"bus_id", "seq", "event"}``); errors name the place."""
    _, events, wire, _ = _codec()
    i = _index(format)
    try:
        raw = wire[i].decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"malformed envelope: {exc}") from None
    try:
        event = events[i].decode(raw.event)
    except msgspec.DecodeError as exc:
        msg = str(exc)
        msg = msg.replace("`$", "`$.event") if " - at `$" in msg else f"{msg} - at `$.event`"
        raise EventDecodeError(f"malformed envelope: {msg}") from None
    return Envelope(bus_id=raw.bus_id, seq=raw.seq, event=event)
