"""evsys-async: an asyncio-native runtime for training loops.

The loop publishes typed events on an in-process async event bus; every
callback runs as an isolated subscriber, so a failing or slow callback never
stalls training or its siblings, and nothing a logger should see is lost.
"""

from __future__ import annotations

from . import events
from .bus import DrainReport, EventBus, SubscriberStats, Subscription
from .callbacks.base import Callback, dispatch
from .callbacks.registry import (
    CallbackSpec,
    build_callbacks,
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
from .loop import TrainingLoop
from .policies import DropOldest, Latest, Lossless
from .state import CallbackHealth, LogContext, LoopArtifacts, LoopState, StepOutput

__version__ = "0.1.0"

__all__ = [
    "Arm",
    "ArmResult",
    "BusClosedError",
    "Callback",
    "CallbackHealth",
    "CallbackSpec",
    "ConfigError",
    "DrainReport",
    "DropOldest",
    "Envelope",
    "Evaluator",
    "Event",
    "EventBus",
    "EventDecodeError",
    "EvsysError",
    "Experiment",
    "ExperimentConfig",
    "ExperimentResult",
    "Latest",
    "LogContext",
    "LoopArtifacts",
    "LoopState",
    "Lossless",
    "MissingExtraError",
    "RunConfig",
    "RunResult",
    "StepOutput",
    "SubscriberStats",
    "Subscription",
    "TrainingLoop",
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
    "register_callback",
    "register_evaluator",
]
