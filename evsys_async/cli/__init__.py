"""``evsys-async``: run a config (or the demo), validate a config, list the kinds,
replay a recorded run, follow or consume a live one (docs/cli.md).

:func:`main` is the ``evsys-async`` script and ``python -m evsys_async``;
:func:`run_cli` runs the same command line and returns the exit code instead
of exiting (for tests and embedding).

The package by concept: ``_main`` (the entry points, the only code that exits
the process), ``_parser`` (the commands and options), ``_run`` (``run``),
``_check`` (``validate`` and the kind lists), ``_replay`` (``replay``, ``tail``,
``consume``), ``_summary`` (what a run prints at its end) and ``_stdio`` (exit
codes, logging setup, a stream a closed pipe ends).
"""

from ._main import main, run_cli

__all__ = ["main", "run_cli"]
