"""Importing what a config names by path: ``"package.module:attr"``.

What this module promises: :func:`import_target` imports only the module the
path names and returns the attribute, or raises a
:class:`~evsys_async.errors.PlacedConfigError` at the place given, saying
which module or attribute could not be imported and why (with the close
name, where there is one). Steps and checkpoints (``config/_imports.py``) and
callback and evaluator kinds (``kinds.py``) all go through it, so a path that
does not import reads the same wherever it is written. Importing runs the
user's module code: it may block for as long as that does.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import ConfigPath, PlacedConfigError, describe, did_you_mean

__all__ = ["import_target"]


def import_target(
    target: str, path: ConfigPath, *, expected: str = "package.module:function"
) -> Any:
    """Import ``"package.module:attr"`` (``attr`` may be dotted) and return it.

    ``expected`` is how the message shows the form (``"package.module:Class"``).
    Raises :class:`PlacedConfigError` at ``path`` for a malformed path, a module
    that is missing or raises on import, or an attribute it lacks.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        head, _, tail = target.rpartition(".")
        hint = f' — did you mean "{head}:{tail}"?' if head and tail and not sep else ""
        raise PlacedConfigError(path, f'expected "{expected}", got {target!r}{hint}')
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
    return obj
