"""The command line's grammar: the ``evsys-async`` parser, its commands and options.

What this module promises: :func:`build_parser` builds a fresh
``argparse.ArgumentParser`` each call (nothing global is changed); every
option that takes a number checks it as it is parsed, so a bad value is
argparse's usage error (exit 2) naming the option, never an error halfway
through a run. ``-v`` and ``--log-level`` are accepted before the command and
after it. Nothing here imports what the commands run.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Protocol

from .._version import __version__

__all__ = ["LOG_LEVEL_ENV", "build_parser", "level_name"]

#: the environment variable that sets the log level when no option does
LOG_LEVEL_ENV = "EVSYS_LOG_LEVEL"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Subparsers(Protocol):
    """What ``add_subparsers`` returns, as far as the commands use it (argparse
    names its class privately)."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser: ...


# -- the commands and their options -----------------------------------------------------


def level_name(text: str) -> str:
    """``text`` as a log level's name (``"info"`` -> ``"INFO"``); raises
    ``argparse.ArgumentTypeError`` naming the levels for anything else."""
    name = text.strip().upper()
    if name not in _LEVELS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log level; use one of {', '.join(_LEVELS)}"
        )
    return name


def _log_options() -> argparse.ArgumentParser:
    """``-v`` and ``--log-level``, accepted before the command and after it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output on stderr: -v for INFO, -vv for DEBUG (debug_logger's lines)",
    )
    common.add_argument(
        "--log-level",
        type=level_name,
        default=argparse.SUPPRESS,
        metavar="LEVEL",
        help=f"the level of the library's log on stderr: {', '.join(_LEVELS)} "
        f"(default WARNING, or ${LOG_LEVEL_ENV})",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The ``evsys-async`` parser: its options, and one subcommand per command."""
    common = _log_options()
    parser = argparse.ArgumentParser(
        prog="evsys-async",
        description="Run training loops from config files; callbacks are isolated subscribers "
        "of an async event bus.",
        epilog="Exit codes: 0 completed or stopped, 1 failed, 2 bad config or arguments, "
        "130 interrupted (SIGINT), 143 terminated (SIGTERM). "
        f"Environment: {LOG_LEVEL_ENV}=DEBUG|INFO|WARNING|ERROR sets the log level.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"evsys-async {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run_parser(sub, common)
    validate = sub.add_parser(
        "validate",
        parents=[common],
        help="check a config without running it",
        description="Check CONFIG completely without running it: structure and types, the "
        "dotted-path imports, every callback's and evaluator's kind and params.",
    )
    validate.add_argument("config", type=Path, help="a .yaml/.yml, .toml or .json file")
    sub.add_parser(
        "callbacks",
        parents=[common],
        help="list the callback kinds with their params",
        description="List every registered callback kind (built-ins and entry points) "
        "with its params: name, type and default.",
    )
    sub.add_parser(
        "evaluators",
        parents=[common],
        help="list the evaluator kinds with their params",
        description="List every registered evaluator kind with its params.",
    )
    _add_more_parsers(sub, common)
    return parser


def _add_run_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``evsys-async run [CONFIG]`` and its options."""
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run a config, or the built-in demo when no config is given",
        description="Run CONFIG (YAML, TOML or JSON), or the built-in demo (logistic "
        "regression by SGD) when no CONFIG is given. Prints the progress, then a summary. "
        "Ctrl-C stops cleanly (the loggers' files are complete); a second Ctrl-C exits at once.",
    )
    run.add_argument("config", nargs="?", type=Path, help="a .yaml/.yml, .toml or .json file")
    run.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the async library to run on (default: asyncio)",
    )
    run.add_argument(
        "--output-dir", type=Path, help="where run directories go (overrides output_dir)"
    )
    run.add_argument("--num-steps", type=int, help="override num_steps")
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="reuse the run directory <output_dir>/<name>/, emptied first (by default a "
        "run that finds it holding another run's files takes <name>-1, <name>-2, ...)",
    )
    run.add_argument(
        "--strict",
        action="store_true",
        help="fail the run (exit 1) for what is otherwise logged and reported: a callback's "
        "error, a metric that is not a number, a logger that lost data (config: strict)",
    )
    run.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="RUN_DIR",
        help="continue a run in its own directory (default <output_dir>/<name>), from the "
        "step after its last checkpoint (checkpoints.jsonl): callbacks get their saved "
        "states back and the writers drop their rows from there on",
    )
    run.add_argument(
        "--start-step",
        type=_positive,
        metavar="K",
        help="with --resume: continue at step K (1-based, as the progress line counts) "
        "instead of after the last checkpoint",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _rank(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a rank (a whole number >= 0), got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _add_more_parsers(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """The commands beyond run, validate and the lists: replay, tail, consume."""
    _add_replay_parser(sub, common)
    _add_tail_parser(sub, common)
    _add_consume_parser(sub, common)


#: what ``tail`` and ``consume`` say of their arguments
_STREAM_ARGS = (
    "URL is the Redis server (redis://[:password@]host:6379/0; shown redacted) and "
    "RUN_KEY the run's key: its stream is evsys:<RUN_KEY>:events."
)


def _add_tail_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``tail``: a live run, printed from its Redis stream (docs/distributed.md)."""
    tail = sub.add_parser(
        "tail",
        parents=[common],
        help="print a live run from its Redis stream, as its progress line does",
        description="Print the run's progress lines (one rank's; --rank) from the start of its "
        "stream, then live, and one line per rank when it ends; exit once every rank has ended "
        f"(0 if each completed or stopped, 1 otherwise). {_STREAM_ARGS}",
    )
    tail.add_argument("url", metavar="URL")
    tail.add_argument("run_key", metavar="RUN_KEY")
    tail.add_argument("--every", type=_positive, default=1, help="a line every N steps")
    tail.add_argument("--rank", type=_rank, default=0, help="whose progress to print (default 0)")
    tail.add_argument(
        "--world-size",
        type=_positive,
        help="how many ranks to wait for (default: as the ranks' TrainStarted say)",
    )
    tail.add_argument(
        "--from-now", action="store_true", help="only what happens from now on, not the past"
    )
    tail.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help=argparse.SUPPRESS
    )


def _add_consume_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    """``consume``: any callbacks on a run's events, as a consumer group member."""
    consume = sub.add_parser(
        "consume",
        parents=[common],
        help="run callbacks on a run's events from its Redis stream (another process or host)",
        description="Run the callbacks of FILE on the run's events as a member of consumer "
        "group G: each batch is acknowledged once every callback handled it, so a consumer "
        "killed and started again with the same group misses nothing, and its files end as an "
        f"uninterrupted consumer's. Exits once every rank of the run has ended. {_STREAM_ARGS}",
    )
    consume.add_argument("url", metavar="URL")
    consume.add_argument("run_key", metavar="RUN_KEY")
    consume.add_argument("--group", required=True, help="the consumer group's name")
    consume.add_argument(
        "--callbacks",
        required=True,
        type=Path,
        metavar="FILE",
        help="the callbacks: a list of {kind, params} (the file replay --callbacks reads)",
    )
    consume.add_argument(
        "--output-dir",
        type=Path,
        default=Path("runs"),
        help="where the consumer's run dir goes (default runs/; a new dir, never the "
        "producer's; a restarted consumer reuses its own)",
    )
    consume.add_argument(
        "--consumer", help="this consumer's name in the group (default: the host name)"
    )
    consume.add_argument("--rank", type=_rank, help="only this rank's events (default: all)")
    consume.add_argument(
        "--world-size", type=_positive, help="how many ranks to wait for (default: as announced)"
    )
    consume.add_argument(
        "--claim-after",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="take over entries another consumer of the group left pending this long (30)",
    )
    consume.add_argument(
        "--backend", choices=("asyncio", "trio"), default="asyncio", help=argparse.SUPPRESS
    )


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a speed; give a number > 0 (2 = twice as fast as recorded)"
        )
    return value


def _add_replay_parser(sub: _Subparsers, common: argparse.ArgumentParser) -> None:
    replay_ = sub.add_parser(
        "replay",
        parents=[common],
        help="run callbacks over a recorded run's events.jsonl",
        description="Publish the events a run recorded (SOURCE: its events.jsonl, or the run "
        "directory) to the callbacks FILE lists, as the live run published them: regenerate "
        "a CSV or TensorBoard logs, try a new callback on a real stream. The callbacks write "
        "into a new run directory, never into SOURCE (docs/replay.md).",
    )
    replay_.add_argument("source", type=Path, help="an events.jsonl, or a run directory")
    replay_.add_argument(
        "--callbacks",
        type=Path,
        required=True,
        metavar="FILE",
        help="a .yaml/.yml, .toml or .json file: a list of {kind, params}, as a config's "
        "callbacks:",
    )
    replay_.add_argument(
        "--only",
        metavar="TYPE,...",
        help="publish only these event types (e.g. StepEnded,EvalEnded)",
    )
    replay_.add_argument(
        "--speed",
        type=_speed,
        metavar="X",
        help="pace by the recorded timestamps, X times as fast (default: as fast as possible)",
    )
    replay_.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip malformed lines (counted and listed) instead of stopping at the first",
    )
    replay_.add_argument(
        "--output-dir",
        type=Path,
        help="where the replay's run directory goes (default: runs; it takes the recorded "
        "run key, or the next free <key>-N)",
    )
    replay_.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="the async library to run on (default: asyncio)",
    )
