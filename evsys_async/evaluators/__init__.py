"""Evaluators: the protocol the loop calls, their lifecycle, the registry of kinds,
and the built-in :class:`HttpEvaluator` (kind ``http``; extra ``http``).

``base`` holds the protocol, :func:`open_evaluators`/:func:`close_evaluators`
and the registry; ``http`` the HTTP evaluator, which imports httpx only when
one is built.
"""

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
from .http import HttpEvalError, HttpEvaluator

__all__ = [
    "ENTRY_POINT_GROUP",
    "EVALUATORS",
    "Evaluator",
    "HttpEvalError",
    "HttpEvaluator",
    "build_evaluators",
    "close_evaluators",
    "get_evaluator",
    "list_evaluators",
    "open_evaluators",
    "register_evaluator",
]
