"""Importing user code: the dotted paths a config names (``step``, ``checkpoint``).

What this module promises: :func:`import_object` imports only the one
``"package.module:attr"`` it is given (``"demo"`` is the built-in demo;
``_util/imports.py`` does the importing) and returns a callable, or raises a
:class:`~evsys_async.errors.PlacedConfigError` at the config key that names
it, saying which module or attribute could not be imported and why (with the
close name, where there is one). Importing runs the user's module code: it may
block for as long as that does. :func:`add_import_dirs` is how the loader
makes a module beside the config importable."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._util.imports import import_target
from ..errors import ConfigPath, PlacedConfigError

__all__ = ["DEMO_STEP", "add_import_dirs", "import_object"]

#: What ``step: demo`` stands for.
DEMO_STEP = "evsys_async.demo:train_step"


def import_object(target: str, *, key: str = "step") -> Callable[..., Any]:
    """Import ``"package.module:attr"`` (``attr`` may be dotted); ``"demo"`` is the demo.

    Raises :class:`PlacedConfigError` at ``key`` saying which module or
    attribute could not be imported and why.
    """
    path: ConfigPath = (key,)
    if target == "demo":
        target = DEMO_STEP
    try:
        obj = import_target(target, path)
    except PlacedConfigError as exc:
        if exc.detail.startswith("expected "):  # the demo is also a form a step may take
            raise PlacedConfigError(
                path, exc.detail.replace(':function"', ':function" (or "demo")', 1)
            ) from None
        raise
    if not callable(obj):
        raise PlacedConfigError(path, f"{target!r} is {type(obj).__name__}, not a callable")
    found: Callable[..., Any] = obj
    return found


def add_import_dirs(*dirs: Path) -> None:
    """Put ``dirs`` (resolved) at the front of ``sys.path``, each once, so a module
    beside the config file or in the working directory imports."""
    for d in dirs:
        text = str(d.resolve())
        if text not in sys.path:
            sys.path.insert(0, text)
