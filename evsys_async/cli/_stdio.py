"""The process's edges: its exit codes, its log on stderr, and streams a closed pipe ends.

What this module promises: :func:`log_level` decides the level once, from the
options, then ``$EVSYS_LOG_LEVEL``, then WARNING; :func:`setup_logging` sends
the ``evsys_async`` logger's records to stderr without touching other
libraries' loggers or a handler the embedding program installed; a
:class:`ClosedPipeSafe` stream turns its reader going away into the quiet end
of the output, never an error (``evsys-async run | head``).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable
from typing import Any, TextIO

from ..errors import ConfigError
from ._parser import LOG_LEVEL_ENV, level_name

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "ClosedPipeSafe",
    "log_level",
    "setup_logging",
]

#: the exit codes the commands return (docs/cli.md): 0 completed or stopped, 1 failed,
#: 2 bad config or arguments; a signal's is 128 + its number (130 SIGINT, 143 SIGTERM)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def log_level(args: argparse.Namespace) -> int:
    """``--log-level``, else ``-v``/``-vv``, else ``$EVSYS_LOG_LEVEL``, else WARNING.

    Raises ConfigError for a bad ``$EVSYS_LOG_LEVEL`` (argparse checks the option).
    """
    name: str | None = getattr(args, "log_level", None)
    verbose = int(getattr(args, "verbose", 0) or 0)
    if name is None and verbose:
        name = "INFO" if verbose == 1 else "DEBUG"
    if name is None and os.environ.get(LOG_LEVEL_ENV, "").strip():
        try:
            name = level_name(os.environ[LOG_LEVEL_ENV])
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"${LOG_LEVEL_ENV}: {exc}") from None
    level: int = getattr(logging, name or "WARNING")
    return level


def setup_logging(level: int, err: TextIO) -> None:
    """Records of the ``evsys_async`` logger at ``level`` and up reach stderr (tracebacks
    included, from ``exc_info``); other libraries' loggers stay at WARNING."""
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(err)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("evsys_async").setLevel(level)


class ClosedPipeSafe:
    """A text stream that treats its reader going away as the end of the output.

    ``evsys-async run | head -2``: once ``head`` exits, writes to stdout fail with
    ``BrokenPipeError`` — in the progress callback's thread, in the summary, and in
    the interpreter's last flush. Here the first such failure points the file
    descriptor at ``os.devnull`` and every later write is dropped, quietly, as a
    Unix tool's output ends when its reader does. The run itself goes on to its
    end, so its files are complete.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.closed_by_reader = False

    def _reader_gone(self) -> None:
        if self.closed_by_reader:
            return
        self.closed_by_reader = True
        try:  # later flushes (the interpreter's last one included) go nowhere, quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def write(self, text: str) -> int:
        if not self.closed_by_reader:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.closed_by_reader:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
