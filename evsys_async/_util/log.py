"""structlog over the stdlib logger ``evsys_async``.

A library never calls ``structlog.configure``: the application owns that.
We wrap the stdlib logger locally, so records reach whatever handlers the
application installed on ``logging``. The message is one line of text
(``callback failed: callback=boom hook=on_step_end error=...``); a traceback
travels as the record's ``exc_info``, never folded into the text, so each
handler (a formatter, Sentry, pytest's caplog) sees it once and renders it
its own way.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["get_logger"]

_STDLIB_NAME = "evsys_async"


def _to_record(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """The stdlib call's keyword arguments: ``msg`` (one line) and ``exc_info``."""
    event = event_dict.pop("event", "")
    exc_info = event_dict.pop("exc_info", None)
    pairs = " ".join(f"{k}={v}" for k, v in event_dict.items())
    out: dict[str, Any] = {"msg": f"{event}: {pairs}" if pairs else str(event)}
    if exc_info is True:
        exc_info = sys.exc_info()
    if isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if exc_info and exc_info != (None, None, None):
        out["exc_info"] = exc_info
    return out


def get_logger(**initial: Any) -> Any:
    """A structlog logger bound to the stdlib logger ``evsys_async``."""
    return structlog.wrap_logger(
        logging.getLogger(_STDLIB_NAME),
        processors=[_to_record],
        wrapper_class=structlog.stdlib.BoundLogger,
        **initial,
    )
