"""What a callback in its own process asks of its run, as tagged msgspec Structs.

In the child, the callback's state (``_remote.py``) turns ``request_stop``,
``request_checkpoint``, ``request_eval`` and ``publish`` into a
:data:`Request`, encodes it and sends the bytes with
:func:`evsys_async.bus.request_parent`; the bus carries them without reading
them; after ``setup``, a ``flush`` or ``teardown`` that changed them it sends
the callback's ``degraded`` and ``disabled_reason`` too (:class:`Health`). In
the parent, the adapter's ``on_request`` decodes the bytes with the union of
the five (:func:`decode_request`) and applies a request to the run's own
state (:func:`apply`), or keeps the health for the report, before the batch
in hand counts as handled. A request of any other shape is an error that
names it.
"""

from __future__ import annotations

import msgspec

from ..events import Event, decode, encode
from ..state import Degraded, LoopState

__all__ = [
    "Checkpoint",
    "Eval",
    "Health",
    "Publish",
    "Request",
    "Stop",
    "apply",
    "decode_request",
    "encode_request",
]


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


class Health(msgspec.Struct, tag="health", array_like=True, frozen=True):
    """How the callback in the child stands, after its ``setup``, a ``flush`` or its
    ``teardown`` changed it: its ``degraded`` and ``disabled_reason``. Not a request
    of the run: the adapter keeps them for the report."""

    degraded: Degraded | None
    disabled_reason: str | None


#: every request a callback's process may send
Request = Stop | Checkpoint | Eval | Publish | Health

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Request)

#: ``encode_request(request) -> bytes``, for ``request_parent``
encode_request = _encoder.encode


def decode_request(data: bytes, *, callback: str) -> Request:
    """The request in ``data`` (sent by ``callback``'s process).

    Raises ``ValueError`` naming a request this end does not know."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(
            f"callback {callback!r} sent a request from its process that the run does not "
            f"know: {_shape(data)!r} ({exc}); expected one of stop, checkpoint, eval, "
            "publish, health"
        ) from None


def apply(state: LoopState, request: Request) -> None:
    """Apply a request of the run to ``state`` (a :class:`Health` is the adapter's).

    Raises :class:`~evsys_async.errors.EventDecodeError` for an event it cannot decode.
    """
    if isinstance(request, Stop):
        state.request_stop(request.reason, failed=request.failed)
    elif isinstance(request, Checkpoint):
        state.request_checkpoint(request.name)
    elif isinstance(request, Eval):
        state.request_eval()
    elif isinstance(request, Publish):
        state.publish(decode(request.event, format="msgpack"))


def _shape(data: bytes) -> object:
    """What an unknown request looks like: its tag when it has one."""
    try:
        shape = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return data[:32]
    return shape[0] if isinstance(shape, list) and shape else shape
