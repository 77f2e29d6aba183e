"""Imports every built-in callback module so each registers under its kind name.

Optional extras (tensorboardX, wandb) are imported by those callbacks when
they are constructed, not here.
"""

from __future__ import annotations
