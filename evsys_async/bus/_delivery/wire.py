"""The wire between a subscriber's process and its parent: one tagged msgspec Struct
per kind of message, msgpack-encoded, one message per pipe write.

Parent -> child (:data:`ToChild`): a :class:`Batch` of ``(seq, event)`` entries
(with whether to flush after it, and whether a failure handling it is announced),
:class:`RunHook` (``on_start`` or ``on_close``), :class:`Call` (a
``Subscription.call``), :class:`End`.

Child -> parent (:data:`ToParent`): one reply per message that wants one —
:class:`Ready` or :class:`Broken` after the program loaded (or did not),
:class:`Done` after a batch or a hook, :class:`Returned` or :class:`Raised`
after a call — and, at any time before it, :class:`Failed` (a handler or hook
raised), :class:`Disabled` (too many failures in a row), :class:`Request`
(for the subscriber's ``on_request``), :class:`Log` (a log record) and
:class:`Output` (a line of stdout or stderr).

Each end decodes with the union of what the other may send, so a message of
the wrong shape or an unknown tag is a :class:`~evsys_async.errors.CallbackProcessError`
that names it, never silently skipped. Events cross in the events' own msgpack
form (the child decodes each with the events codec); pickle is used only for
what must be arbitrary Python objects: the handler program (sent once, at
start), a ``Subscription.call``'s function and result, and exceptions.
"""

from __future__ import annotations

import pickle
from typing import Generic, Literal, TypeVar

import msgspec

from ..._util.traceback import user_traceback
from ...errors import CallbackProcessError, ChildTraceback, describe

__all__ = [
    "REPLIES",
    "Batch",
    "Broken",
    "Call",
    "Disabled",
    "Done",
    "End",
    "Failed",
    "Failure",
    "HookSlot",
    "Log",
    "Output",
    "Raised",
    "Ready",
    "Request",
    "Returned",
    "RunHook",
    "Settings",
    "ToChild",
    "ToParent",
    "decode_from_child",
    "decode_from_parent",
    "encode",
    "failure_of",
    "rebuild",
]

T = TypeVar("T")


class Settings(msgspec.Struct, frozen=True):
    """How the child runs its program (handed to the process at its start)."""

    #: the event loop the child runs: the parent's backend
    backend: Literal["asyncio", "trio"]
    #: the handler is awaited on the child's loop (else it runs in a thread there)
    is_async: bool
    #: the handler takes envelopes
    envelopes: bool
    #: the parent bus's id (the envelopes' ``bus_id``)
    bus_id: str
    #: the parent's root logger level, and the levels set on its loggers by name
    root_level: int
    levels: dict[str, int]
    #: this many event failures in a row disable the handler (None: never)
    max_consecutive_failures: int | None = None


# -- parent -> child -----------------------------------------------------------------


class Batch(msgspec.Struct, Generic[T], tag="batch", array_like=True):
    """Handle these events in order; with ``flush``, run ``on_batch_end`` after them.
    ``quiet``: the batch is only ``CallbackFailed`` events (a failure is not announced)."""

    flush: bool
    quiet: bool
    #: ``(seq, event)``: events on the parent's side, ``msgspec.Raw`` on the child's
    items: list[tuple[int, T]]


#: the lifecycle hooks the parent asks for by name (``on_batch_end`` runs with a batch)
HookSlot = Literal["on_start", "on_close"]


class RunHook(msgspec.Struct, tag="hook", array_like=True):
    """Run a lifecycle hook of the program."""

    slot: HookSlot


class Call(msgspec.Struct, tag="call", array_like=True):
    """``Subscription.call``: run the pickled function where the handler runs."""

    fn: bytes


class End(msgspec.Struct, tag="end", array_like=True):
    """Exit once what came before is done."""


#: what the child decodes
ToChild = Batch[msgspec.Raw] | RunHook | Call | End


# -- child -> parent -----------------------------------------------------------------


class Failure(msgspec.Struct, array_like=True):
    """An exception as it crosses: pickled when it pickles, its one line, its traceback
    text (the callback's frames only)."""

    exception: bytes | None
    summary: str
    traceback: str


class Ready(msgspec.Struct, tag="ready", array_like=True):
    """The program is loaded."""


class Broken(msgspec.Struct, tag="broken", array_like=True):
    """The program could not be loaded: what failed, and the whole traceback."""

    summary: str
    traceback: str


class Done(msgspec.Struct, tag="done", array_like=True):
    """The batch (and its flush) or the hook is done."""


class Returned(msgspec.Struct, tag="returned", array_like=True):
    """A call's result, pickled."""

    value: bytes


class Raised(msgspec.Struct, tag="raised", array_like=True):
    """What a call raised."""

    failure: Failure


class Failed(msgspec.Struct, tag="failed", array_like=True):
    """A handler call (``index`` in the batch) or a hook (``index`` -1, its ``slot``)
    raised; sent before the shared counter moves past the event. Only the first
    failure of its kind (event type or hook, exception type) carries the exception
    (``failure``); a later one carries its type's name (``kind``) and nothing to
    format: failing is cheap in the child too."""

    index: int
    slot: str
    quiet: bool
    failure: Failure | None
    kind: str = ""


class Disabled(msgspec.Struct, tag="disabled", array_like=True):
    """The handler failed ``max_consecutive_failures`` times in a row: the events of the
    batch from ``cut`` on were not handled (dropped); no flush follows. Sent after
    that last failure's :class:`Failed`, before ``Done``."""

    reason: str
    cut: int


class Request(msgspec.Struct, tag="request", array_like=True):
    """For the subscriber's ``on_request`` in the parent: opaque bytes (the callbacks
    layer sends its own tagged Structs)."""

    data: bytes


class Log(msgspec.Struct, tag="log", array_like=True):
    """A log record of the child, to re-emit through the parent's logger ``name``."""

    name: str
    level: int
    message: str
    exc_text: str | None


class Output(msgspec.Struct, tag="output", array_like=True):
    """Text written to the child's stdout (1) or stderr (2): whole lines, or the rest
    at a flush."""

    stream: Literal[1, 2]
    text: str


#: what the parent decodes
ToParent = Ready | Broken | Done | Returned | Raised | Failed | Disabled | Request | Log | Output
#: the messages that answer the one the parent sent (the rest may come at any time)
REPLIES = (Ready, Broken, Done, Returned, Raised)

_encoder = msgspec.msgpack.Encoder()
_from_child = msgspec.msgpack.Decoder(ToParent)
_from_parent = msgspec.msgpack.Decoder(ToChild)

#: ``encode(message) -> bytes``: any message of either direction
encode = _encoder.encode


def decode_from_child(data: bytes) -> ToParent:
    """A message the child sent; :class:`CallbackProcessError` naming it if it is none."""
    try:
        return _from_child.decode(data)
    except msgspec.DecodeError as exc:
        raise _unknown(data, "the subscriber's process", exc) from None


def decode_from_parent(data: bytes) -> ToChild:
    """A message the parent sent; :class:`CallbackProcessError` naming it if it is none."""
    try:
        return _from_parent.decode(data)
    except msgspec.DecodeError as exc:
        raise _unknown(data, "the parent", exc) from None


def _unknown(data: bytes, sender: str, exc: msgspec.DecodeError) -> CallbackProcessError:
    try:
        shape = msgspec.msgpack.decode(data)
        tag = shape[0] if isinstance(shape, list) and shape else shape
    except msgspec.DecodeError:
        tag = data[:16]
    return CallbackProcessError(
        f"{sender} sent a message this end does not know: {tag!r} ({exc}); both ends "
        "must run the same evsys_async (reinstall it, then start again)"
    )


def failure_of(exc: BaseException) -> Failure:
    """An exception as it crosses to the parent (the child's side)."""
    try:
        data: bytes | None = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        data = None
    return Failure(data, describe(exc), user_traceback(exc))  # the callback's frames, not ours


def rebuild(failure: Failure) -> BaseException:
    """The child's exception, rebuilt here when it unpickles (else a
    :class:`CallbackProcessError` with its one line), with the child's traceback
    text as its ``__cause__`` (the parent's side)."""
    exc: BaseException | None = None
    if failure.exception is not None:
        try:
            exc = pickle.loads(failure.exception)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = CallbackProcessError(failure.summary)
    exc.__cause__ = ChildTraceback(failure.traceback)
    return exc
