"""Evaluators: the protocol the loop calls, their lifecycle, the registry of kinds."""

from __future__ import annotations

from .base import (
    ENTRY_POINT_GROUP,
    EVALUATORS,
    Evaluator,
    build_evaluators,
    close_evaluators,
    get_evaluator,
    list_evaluators,
    open_evaluators,
    register_evaluator,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "EVALUATORS",
    "Evaluator",
    "build_evaluators",
    "close_evaluators",
    "get_evaluator",
    "list_evaluators",
    "open_evaluators",
    "register_evaluator",
]
