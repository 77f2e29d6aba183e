"""Callbacks: the base class, ``dispatch``, the registry and the eight built-ins.

Every name of the original system's callbacks module imports from here (and
from ``evsys_async``)::

    from evsys_async.callbacks import CsvMetricsCallback, EarlyStoppingCallback

Importing this package registers the built-ins under their kind names
(``print_progress``, ``csv_metrics``, ...). Optional extras (tensorboardX,
wandb) are imported when those callbacks are constructed, never here.
"""

from __future__ import annotations

from ..state import LogContext, LoopState
from .base import Callback, dispatch
from .csv_metrics import CsvMetricsCallback
from .debug_logger import DebugLoggerCallback
from .early_stopping import EarlyStoppingCallback
from .evsys_logger import EvsysLoggerCallback
from .local_logger import LocalLoggerCallback
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
