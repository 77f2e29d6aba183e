"""User paths as users write them: ``~`` and ``$VAR`` expanded, everywhere a path is given.

Every path parameter (``output_dir``, a logger's ``out_path`` or ``log_dir``,
a CLI path) goes through :func:`expand_path`, so ``log_dir: ~/tb`` means the
home directory, never a directory named ``~``. A variable that is not set is
an error naming it, not a directory named ``$VAR``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ConfigError

__all__ = ["expand_path"]

_VAR = re.compile(r"\$(\w+)|\$\{([^}]*)\}")


def expand_path(path: str | os.PathLike[str], *, what: str = "path") -> Path:
    """``path`` with ``~``/``~user`` and ``$VAR``/``${VAR}`` expanded.

    Raises :class:`~evsys_async.errors.ConfigError` naming ``what`` and the
    variable when a referenced environment variable is not set.
    """
    text = os.fspath(path)
    for match in _VAR.finditer(text):
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise ConfigError(
                f"{what} {text!r} names the environment variable ${name}, which is not set; "
                f"set it (export {name}=...) or write the path out"
            )
    return Path(os.path.expanduser(os.path.expandvars(text)))
