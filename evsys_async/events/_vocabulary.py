# msgspec inherits frozen=True to subclasses; mypy's dataclass_transform model does not know.
# mypy: disable-error-code="misc"
"""The event vocabulary: what a run, an experiment and the runtime publish.

Every class here is a frozen, keyword-only, tagged :class:`Event` whose tag is
its class name; the names, fields and tags are part of the public contract
(event logs and Redis streams hold them). Loop scope: ``TrainStarted``,
``StepEnded``, ``EvalEnded``, ``EvalFailed``, ``CheckpointSaved``,
``StopRequested``, ``TrainEnded``; experiment scope: ``ExperimentStarted``,
``GroupStarted``, ``RunStarted``, ``BenchmarkEvaluated``, ``RunEnded``,
``ExperimentEnded``; runtime health: ``CallbackFailed``, ``SubscriberLagged``;
and :class:`UnknownEvent`, the stand-in for a type not defined in this process.

Annotations are real objects, not strings, for the reason ``_base`` gives.
"""

from typing import Any, ClassVar, TypeAlias

import msgspec

from ._base import PUBLIC_MODULE, Event

__all__ = [
    "BenchmarkEvaluated",
    "CallbackFailed",
    "CheckpointSaved",
    "EvalEnded",
    "EvalFailed",
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
]

Metrics: TypeAlias = dict[str, float]


# -- loop scope -------------------------------------------------------------------


class TrainStarted(Event, kw_only=True):
    """A run (or one rank of it) began. ``world_size`` is how many ranks the run has:
    a consumer following every rank ends after that many ``TrainEnded``."""

    num_steps: int
    start_step: int = 0
    output_dir: str = ""
    world_size: int = 1
    #: the run's hyperparameters (``TrainingLoop(config=...)``, a config file's params
    #: and settings), secrets redacted: what replay, consumers and loggers record
    config: dict[str, Any] = msgspec.field(default_factory=dict)


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

    Failures are coalesced: ``count`` is how many failures of this subscriber,
    hook and exception type the event stands for (1 for the first; later ones
    are summed and published at growing intervals), and ``error`` is the text
    of the first of them. The callback report's ``failed`` still counts every
    failed event.

    ``traceback`` is the traceback text of a failure in a subscriber's own
    process (``isolation="process"``), whose frames are not in this one; empty
    otherwise (an in-process failure's traceback is on its WARNING record).
    """

    subscriber: str
    hook: str
    event_type: str
    error: str
    traceback: str = ""
    count: int = 1


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


for _public in (
    TrainStarted,
    StepEnded,
    EvalEnded,
    EvalFailed,
    CheckpointSaved,
    StopRequested,
    TrainEnded,
    ExperimentStarted,
    GroupStarted,
    RunStarted,
    BenchmarkEvaluated,
    RunEnded,
    ExperimentEnded,
    CallbackFailed,
    SubscriberLagged,
    UnknownEvent,
):
    _public.__module__ = PUBLIC_MODULE
