"""What a resumed run takes back: callback states by a stable key, files cut at the resume step.

Callback states go to ``callbacks_state.json`` keyed by each callback's
``state_key``: a string attribute or property of the callback, by default its
class name (``EarlyStoppingCallback`` builds one from its identifying
parameters: metric, eval name and mode). The key, not the callback's place in
the list, finds a state again, so reordered callbacks get their own states
back. Two stateful callbacks with one key are refused before the first step;
a saved state that no callback claims is a WARNING (a renamed metric, a
removed callback).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._util.log import get_logger

__all__ = ["check_state_keys", "load_callback_states", "state_key"]

_log = get_logger()


def _stateful(callback: object) -> bool:
    return callable(getattr(callback, "state_dict", None))


def state_key(callback: object) -> str:
    """The key of ``callback``'s saved state: its ``state_key``, else its class name."""
    key = getattr(callback, "state_key", None)
    return key if isinstance(key, str) and key else type(callback).__name__


def check_state_keys(callbacks: Sequence[object]) -> None:
    """Refuse two callbacks with ``state_dict()`` that would save under one key.

    Raises ``ValueError`` naming the key and the fix.
    """
    seen: dict[str, object] = {}
    for cb in callbacks:
        if not _stateful(cb):
            continue
        key = state_key(cb)
        if key in seen:
            raise ValueError(
                f"two callbacks save their state under one key {key!r} ({seen[key]!r} and "
                f"{cb!r}), so a resume could not tell them apart; give each a distinct "
                "`state_key` (a class attribute or a constructor argument)"
            )
        seen[key] = cb


def load_callback_states(path: Path, callbacks: Sequence[object]) -> None:
    """Hand each callback with ``load_state_dict`` its state saved under its key.

    A saved state that no callback claims is logged at WARNING; the run goes on.
    """
    if not path.exists():
        return
    states: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    claimed: set[str] = set()
    for cb in callbacks:
        key = state_key(cb)
        loader = getattr(cb, "load_state_dict", None)
        if key in states and callable(loader):
            loader(states[key])
            claimed.add(key)
    unclaimed = sorted(set(states) - claimed)
    if unclaimed:
        _log.warning(
            "saved callback states that no callback of this run claims were not loaded "
            "(a callback removed, or its state_key changed)",
            keys=", ".join(unclaimed),
            path=str(path),
        )
