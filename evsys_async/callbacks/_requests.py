"""What a callback in its own process asks of its run, as tagged msgspec Structs.

In the child, the callback's state (``_remote.py``) turns ``request_stop``,
``request_checkpoint``, ``request_eval`` and ``publish`` into a
:data:`Request`, encodes it and sends the bytes with
:func:`evsys_async.bus.request_parent`; the bus carries them without reading
them. In the parent, the adapter's ``on_request`` hands the bytes to
:func:`apply`, which decodes them with the union of the four and applies the
request to the run's own state, before the batch in hand counts as handled.
A request of any other shape is an error that names it.
"""

from __future__ import annotations

import msgspec

from ..events import Event, decode, encode
from ..state import LoopState

__all__ = ["Checkpoint", "Eval", "Publish", "Request", "Stop", "apply", "encode_request"]


class Stop(msgspec.Struct, tag="stop", array_like=True, frozen=True):
    """``state.request_stop(reason, failed=failed)``."""

    reason: str | None
    failed: bool


class Checkpoint(msgspec.Struct, tag="checkpoint", array_like=True, frozen=True):
    """``state.request_checkpoint(name)``."""

    name: str


class Eval(msgspec.Struct, tag="eval", array_like=True, frozen=True):
    """``state.request_eval()``."""


class Publish(msgspec.Struct, tag="publish", array_like=True, frozen=True):
    """``state.publish(event)``: the event in the events' msgpack form."""

    event: bytes

    @classmethod
    def of(cls, event: Event) -> Publish:
        return cls(encode(event, format="msgpack"))


#: every request a callback's process may send
Request = Stop | Checkpoint | Eval | Publish

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Request)

#: ``encode_request(request) -> bytes``, for ``request_parent``
encode_request = _encoder.encode


def apply(state: LoopState, data: bytes, *, callback: str) -> None:
    """Apply the request in ``data`` (sent by ``callback``'s process) to ``state``.

    Raises ``ValueError`` naming a request this end does not know, and
    :class:`~evsys_async.errors.EventDecodeError` for an event it cannot decode.
    """
    try:
        request = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(
            f"callback {callback!r} sent a request from its process that the run does not "
            f"know: {_shape(data)!r} ({exc}); expected one of stop, checkpoint, eval, publish"
        ) from None
    if isinstance(request, Stop):
        state.request_stop(request.reason, failed=request.failed)
    elif isinstance(request, Checkpoint):
        state.request_checkpoint(request.name)
    elif isinstance(request, Eval):
        state.request_eval()
    else:
        state.publish(decode(request.event, format="msgpack"))


def _shape(data: bytes) -> object:
    """What an unknown request looks like: its tag when it has one."""
    try:
        shape = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return data[:32]
    return shape[0] if isinstance(shape, list) and shape else shape
