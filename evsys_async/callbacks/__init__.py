"""Callbacks: the base class, ``dispatch``, the registry, the nine built-ins and
``SinkCallback``.

Every name of the original system's callbacks module imports from here (and
from ``evsys_async``)::

    from evsys_async.callbacks import CsvMetricsCallback, EarlyStoppingCallback

Importing this package registers the built-ins under their kind names
(``print_progress``, ``csv_metrics``, ...). Optional extras (tensorboardX,
wandb, mlflow) are imported when those callbacks are built or set up, never here.

The modules: ``base`` (``Callback``, each hook documented), ``registry``, one
module per built-in; the runtime's side is private — ``_hooks`` (the hooks as
data), ``_runner`` (a callback's hooks as a bus handler), ``_adapter`` (one
callback as one bus subscriber), ``_remote`` and ``_requests`` (a callback in
its own process, and what it asks of the run), ``_dispatch``; ``_format`` and
``_values`` help the built-ins.
"""

from __future__ import annotations

from ..state import LogContext, LoopState
from ._dispatch import dispatch
from .base import Callback
from .csv_metrics import CsvMetricsCallback
from .debug_logger import DebugLoggerCallback
from .early_stopping import EarlyStoppingCallback
from .evsys_logger import EvsysLoggerCallback
from .local_logger import LocalLoggerCallback
from .mlflow_logger import MlflowLoggerCallback
from .print_progress import PrintProgressCallback
from .registry import (
    CallbackSpec,
    build_callbacks,
    get_callback,
    list_callbacks,
    register_callback,
)
from .sink import SinkCallback
from .tensorboard_logger import TensorBoardLoggerCallback
from .wandb_logger import WandbLoggerCallback

__all__ = [
    "Callback",
    "CallbackSpec",
    "CsvMetricsCallback",
    "DebugLoggerCallback",
    "EarlyStoppingCallback",
    "EvsysLoggerCallback",
    "LocalLoggerCallback",
    "LogContext",
    "LoopState",
    "MlflowLoggerCallback",
    "PrintProgressCallback",
    "SinkCallback",
    "TensorBoardLoggerCallback",
    "WandbLoggerCallback",
    "build_callbacks",
    "dispatch",
    "get_callback",
    "list_callbacks",
    "register_callback",
]
