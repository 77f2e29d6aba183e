"""The codec: events and envelopes to JSON or msgpack and back, through one tagged union.

What this module promises:

* :func:`decode` and :func:`decode_envelope` know every :class:`Event` subclass
  defined so far, built-in or a user's: the tagged union is rebuilt when a new
  class has been defined since the last call, and cached otherwise;
* every failure is an :class:`~evsys_async.errors.EventDecodeError` that names
  the place (msgspec's ``- at `$.event.step```), or the two classes that share
  a tag and the fix; JSON nested deeper than ``MAX_DEPTH`` is refused before it
  is decoded (never a ``RecursionError``);
* JSON keeps NaN and infinities (as the strings msgspec reads back), and an
  :class:`UnknownEvent` is written as the event it stands for, so both round-trip.

Nothing here blocks or awaits; the module-level encoders and cache are shared
by every thread (msgspec encoders and decoders are thread-safe; the cache is
replaced whole, never edited).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from .._util.jsonl import MAX_DEPTH, non_finite_as_strings, too_deep
from ..errors import EventDecodeError, did_you_mean
from ._base import Envelope, Event, event_classes
from ._vocabulary import UnknownEvent

__all__ = ["decode", "decode_envelope", "encode", "event_type", "event_types"]


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
    classes = event_classes()
    n = len(classes)
    if _codec_cache is not None and _codec_cache[0] == n:
        return _codec_cache
    by_tag: dict[str, type[Event]] = {"Event": Event}
    for cls in classes:
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


_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels of arrays and objects"


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
    if format == "json" and too_deep(data):
        raise EventDecodeError(f"malformed event: {_TOO_DEEP}")
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
    if format == "json" and too_deep(data):
        raise EventDecodeError(f"malformed envelope: {_TOO_DEEP}")
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
