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

``_base`` holds :class:`Event` (and its per-class freezing) and
:class:`Envelope`; ``_vocabulary`` the built-in events; ``_codec`` encoding and
decoding; ``_frozen`` the read-only dicts and lists events hold. Every public
class says it is from ``evsys_async.events``, its public path.
"""

from ._base import Envelope, Event
from ._codec import decode, decode_envelope, encode, event_type, event_types
from ._vocabulary import (
    BenchmarkEvaluated,
    CallbackFailed,
    CheckpointSaved,
    EvalEnded,
    EvalFailed,
    ExperimentEnded,
    ExperimentStarted,
    GroupStarted,
    RunEnded,
    RunStarted,
    StepEnded,
    StopRequested,
    SubscriberLagged,
    TrainEnded,
    TrainStarted,
    UnknownEvent,
)

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
