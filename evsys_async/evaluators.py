"""Evaluators: the protocol the loop calls, and the registry of kinds configs name.

An evaluator has ``name: str``, ``run_every: int`` (it fires after step k when
``(k + 1) % run_every == 0``; 0 never) and ``async def evaluate(state,
step_idx) -> Mapping[str, float]``. The loop runs the due ones concurrently,
each under ``eval_timeout``; a failure or timeout is a WARNING and an
``EvalFailed`` event, and training goes on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from .state import LoopState

__all__ = ["Evaluator"]


@runtime_checkable
class Evaluator(Protocol):
    """What the loop needs of an evaluator."""

    name: str
    run_every: int

    async def evaluate(self, state: LoopState, step_idx: int) -> Mapping[str, Any]: ...
