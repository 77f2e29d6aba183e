"""structlog over the stdlib logger ``evsys_async``.

A library never calls ``structlog.configure``: the application owns that.
We wrap the stdlib logger locally, so records reach whatever handlers the
application installed on ``logging``, and the *message text* carries the
key/value pairs and the traceback (tests and log files read it as text).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = ["get_logger"]

_STDLIB_NAME = "evsys_async"


def _render(_logger: Any, _name: str, event_dict: MutableMapping[str, Any]) -> str:
    # "callback failed: callback=Boom hook=on_step_end error=..." then the traceback.
    event = event_dict.pop("event", "")
    exc = event_dict.pop("exception", None)
    pairs = " ".join(f"{k}={v}" for k, v in event_dict.items())
    text = f"{event}: {pairs}" if pairs else str(event)
    return f"{text}\n{exc}" if exc else text


def get_logger(**initial: Any) -> Any:
    """A structlog logger bound to the stdlib logger ``evsys_async``."""
    return structlog.wrap_logger(
        logging.getLogger(_STDLIB_NAME),
        processors=[structlog.processors.format_exc_info, _render],
        wrapper_class=structlog.stdlib.BoundLogger,
        **initial,
    )
