"""Imports every built-in callback module so each registers under its kind name.

Optional extras (tensorboardX, wandb) are imported by those callbacks when
they are constructed, not here.
"""

from __future__ import annotations

from . import (  # noqa: F401 - imported for their @register_callback side effect
    csv_metrics,
    debug_logger,
    early_stopping,
    evsys_logger,
    local_logger,
    print_progress,
    tensorboard_logger,
    wandb_logger,
)
