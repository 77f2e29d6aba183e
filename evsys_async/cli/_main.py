"""``evsys-async``: run a config (or the demo), validate a config, list the kinds.

::

    evsys-async [-v] [--log-level LEVEL] [--version]
    evsys-async run [CONFIG] [--backend asyncio|trio] [--output-dir DIR] [--num-steps N]
                    [--overwrite]
    evsys-async validate CONFIG
    evsys-async replay SOURCE --callbacks FILE [--only TYPE,...] [--speed X] [--skip-bad]
                       [--output-dir DIR] [--backend asyncio|trio]
    evsys-async callbacks
    evsys-async evaluators
    evsys-async tail URL RUN_KEY [--every N] [--rank R] [--world-size N] [--from-now]
    evsys-async consume URL RUN_KEY --group G --callbacks FILE [--output-dir DIR]
                        [--consumer NAME] [--rank R] [--world-size N] [--claim-after S]

Exit codes: 0 completed or stopped, 1 failed, 2 bad config or arguments,
130 SIGINT, 143 SIGTERM (docs/cli.md). This is the only module that exits
the process (:func:`main`); everything else raises.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO, cast

from ..callbacks.registry import list_callbacks
from ..errors import ConfigError, MissingExtraError
from ..evaluators import list_evaluators
from ..transports import RedisUnavailableError
from ._check import cmd_list, cmd_validate
from ._parser import build_parser
from ._replay import cmd_consume, cmd_replay, cmd_tail
from ._run import cmd_run
from ._stdio import EXIT_FAILED, EXIT_USAGE, ClosedPipeSafe, log_level, setup_logging

__all__ = ["main", "run_cli"]


def run_cli(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command line; return the exit code (argparse errors exit with 2 themselves)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = build_parser().parse_args(argv)
    try:
        setup_logging(log_level(args), err)
        if args.command == "run":
            return cmd_run(args, out, err)
        if args.command == "validate":
            return cmd_validate(args, out)
        if args.command == "replay":
            return cmd_replay(args, out, err)
        if args.command == "callbacks":
            return cmd_list(list_callbacks(), "callback", out)
        if args.command == "tail":
            return cmd_tail(args, out, err)
        if args.command == "consume":
            return cmd_consume(args, out, err)
        return cmd_list(list_evaluators(), "evaluator", out)
    except ConfigError as exc:
        print(f"evsys-async: bad config: {exc}", file=err)
        return EXIT_USAGE
    except RedisUnavailableError as exc:  # tail/consume: nothing to read from
        print(f"evsys-async: {exc}", file=err)
        return EXIT_FAILED
    except MissingExtraError as exc:  # an optional dependency this command needs
        print(f"evsys-async: {exc}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the signal handlers were installed
        return 130


def main(argv: Sequence[str] | None = None) -> None:
    """The ``evsys-async`` script: exits with :func:`run_cli`'s code."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)  # progress lines reach a pipe as they happen
    sys.stdout = cast(TextIO, ClosedPipeSafe(sys.stdout))
    sys.stderr = cast(TextIO, ClosedPipeSafe(sys.stderr))
    code = run_cli(argv)
    sys.stdout.flush()
    sys.exit(code)
