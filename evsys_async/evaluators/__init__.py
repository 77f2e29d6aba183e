"""Evaluators: the protocol the loop calls, their lifecycle, the registry of kinds,
and the built-in :class:`HttpEvaluator` (kind ``http``; extra ``http``).

``base`` holds the protocol, the registry, and the lifecycle calls the loop
makes (``open_evaluators``/``close_evaluators``, loop internals: they are in
``base``'s ``__all__``, not this package's); ``http`` the HTTP evaluator, which
imports httpx only when one is built.
"""

from __future__ import annotations

from .base import (
    ENTRY_POINT_GROUP,
    EVALUATORS,
    Evaluator,
    build_evaluators,
    get_evaluator,
    list_evaluators,
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
    "get_evaluator",
    "list_evaluators",
    "register_evaluator",
]
