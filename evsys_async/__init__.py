"""evsys-async: an asyncio-native runtime for training loops.

The loop publishes typed events on an in-process async event bus; every
callback runs as an isolated subscriber, so a failing or slow callback never
stalls training or its siblings, and nothing a logger should see is lost.
"""

from __future__ import annotations

from . import events, transports
from ._version import __version__ as __version__
from .bus import DrainReport, EventBus, SubscriberStats, Subscription
from .callbacks import (
    Callback,
    CallbackSpec,
    CsvMetricsCallback,
    DebugLoggerCallback,
    EarlyStoppingCallback,
    EvsysLoggerCallback,
    LocalLoggerCallback,
    MlflowLoggerCallback,
    PrintProgressCallback,
    SinkCallback,
    TensorBoardLoggerCallback,
    WandbLoggerCallback,
    build_callbacks,
    dispatch,
    get_callback,
    list_callbacks,
    register_callback,
)
from .config import (
    ExperimentConfig,
    RunConfig,
    build_experiment,
    build_loop,
    load_config,
)
from .errors import (
    BusClosedError,
    ConfigError,
    EventDecodeError,
    EvsysError,
    MissingExtraError,
)
from .evaluators import (
    Evaluator,
    build_evaluators,
    get_evaluator,
    list_evaluators,
    register_evaluator,
)
from .events import Envelope, Event
from .experiment import Arm, ArmResult, Experiment, ExperimentResult, RunResult
from .loop import LoopSubscription, TrainingLoop
from .policies import DropOldest, Latest, Lossless
from .replay import ReplayReport, read_events, replay
from .session import Session
from .state import CallbackHealth, Degraded, LogContext, LoopArtifacts, LoopState, StepOutput

__all__ = [
    "Arm",
    "ArmResult",
    "BusClosedError",
    "Callback",
    "CallbackHealth",
    "CallbackSpec",
    "ConfigError",
    "CsvMetricsCallback",
    "DebugLoggerCallback",
    "Degraded",
    "DrainReport",
    "DropOldest",
    "EarlyStoppingCallback",
    "Envelope",
    "Evaluator",
    "Event",
    "EventBus",
    "EventDecodeError",
    "EvsysError",
    "EvsysLoggerCallback",
    "Experiment",
    "ExperimentConfig",
    "ExperimentResult",
    "Latest",
    "LocalLoggerCallback",
    "LogContext",
    "LoopArtifacts",
    "LoopState",
    "LoopSubscription",
    "Lossless",
    "MissingExtraError",
    "MlflowLoggerCallback",
    "PrintProgressCallback",
    "ReplayReport",
    "RunConfig",
    "RunResult",
    "Session",
    "SinkCallback",
    "StepOutput",
    "SubscriberStats",
    "Subscription",
    "TensorBoardLoggerCallback",
    "TrainingLoop",
    "WandbLoggerCallback",
    "build_callbacks",
    "build_evaluators",
    "build_experiment",
    "build_loop",
    "dispatch",
    "events",
    "get_callback",
    "get_evaluator",
    "list_callbacks",
    "list_evaluators",
    "load_config",
    "read_events",
    "register_callback",
    "register_evaluator",
    "replay",
    "transports",
]
