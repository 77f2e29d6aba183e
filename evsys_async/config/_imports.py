"""Importing user code: the dotted paths a config names (``step``, ``checkpoint``).

What this module promises: :func:`import_object` imports only the one
``"package.module:attr"`` it is given (``"demo"`` is the built-in demo) and
returns a callable, or raises a :class:`~evsys_async.errors.PlacedConfigError`
at the config key that names it, saying which module or attribute could not be
imported and why (with the close name, where there is one). Importing runs the
user's module code: it may block for as long as that does.
:func:`add_import_dirs` is how the loader makes a module beside the config
importable.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigPath, PlacedConfigError, describe, did_you_mean

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
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PlacedConfigError(
            path,
            f'expected "package.module:function" (or "demo"), got {target!r}'
            + (
                f' — did you mean "{target.rpartition(".")[0]}:{target.rpartition(".")[2]}"?'
                if "." in target and not sep
                else ""
            ),
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise PlacedConfigError(
            path,
            f"could not import module {module_name!r} for {target!r}: no module named "
            f"{missing!r} (is it installed, or beside the config file?)",
        ) from None
    except Exception as exc:
        raise PlacedConfigError(
            path,
            f"importing module {module_name!r} for {target!r} raised {describe(exc)}",
        ) from exc
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = ".".join([module_name, *attr.split(".")[:i]])
            names = [n for n in dir(obj) if not n.startswith("_")]
            hint = did_you_mean(part, names)
            raise PlacedConfigError(
                path, f"could not import {target!r}: {where!r} has no attribute {part!r}{hint}"
            )
        obj = getattr(obj, part)
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
