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
the process; everything else raises.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import msgspec

from .._util.signals import Interrupted, run_with_signals, signal_name
from .._util.traceback import user_traceback
from .._version import __version__
from ..bus import EventBus
from ..callbacks._format import eval_metric_name, fmt_value
from ..callbacks.registry import list_callbacks
from ..config import (
    ExperimentConfig,
    RunConfig,
    build_experiment,
    build_loop,
    load_callbacks,
    load_config,
)
from ..errors import ConfigError, EventDecodeError, MissingExtraError, describe
from ..evaluators import list_evaluators
from ..events import EvalEnded
from ..experiment import ExperimentResult
from ..replay import ReplayReport, replay
from ..state import CallbackHealth, LoopArtifacts
from ..transports import RedisUnavailableError

__all__ = ["main", "run_cli"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

#: the environment variable that sets the log level when no option does
LOG_LEVEL_ENV = "EVSYS_LOG_LEVEL"
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


# -- argument parsing ------------------------------------------------------------------


def _level_name(text: str) -> str:
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
        type=_level_name,
        default=argparse.SUPPRESS,
        metavar="LEVEL",
        help=f"the level of the library's log on stderr: {', '.join(_LEVELS)} "
        f"(default WARNING, or ${LOG_LEVEL_ENV})",
    )
    return common


def _parser() -> argparse.ArgumentParser:
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


def _add_more_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """The commands beyond run, validate and the lists: replay, tail, consume."""
    _add_replay_parser(sub, common)
    _add_tail_parser(sub, common)
    _add_consume_parser(sub, common)


#: what ``tail`` and ``consume`` say of their arguments
_STREAM_ARGS = (
    "URL is the Redis server (redis://[:password@]host:6379/0; shown redacted) and "
    "RUN_KEY the run's key: its stream is evsys:<RUN_KEY>:events."
)


def _add_tail_parser(sub: Any, common: argparse.ArgumentParser) -> None:
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


def _add_consume_parser(sub: Any, common: argparse.ArgumentParser) -> None:
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


# -- commands --------------------------------------------------------------------------


def _load(path: Path | None, args: argparse.Namespace) -> RunConfig | ExperimentConfig:
    if path is None:
        from ..demo import demo_config

        config: RunConfig | ExperimentConfig = demo_config()
    else:
        config = load_config(path)
    run = config.run if isinstance(config, ExperimentConfig) else config
    changes: dict[str, Any] = {}
    if getattr(args, "output_dir", None) is not None:
        changes["output_dir"] = str(args.output_dir)
    if getattr(args, "overwrite", False):
        changes["overwrite"] = True
    if getattr(args, "num_steps", None) is not None:
        if args.num_steps < 1:
            raise ConfigError(f"--num-steps must be >= 1, got {args.num_steps}")
        changes["num_steps"] = args.num_steps
    if changes:
        run = msgspec.structs.replace(run, **changes)
        if isinstance(config, ExperimentConfig):
            return msgspec.structs.replace(config, run=run)
        return run
    return config


def _cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        print("evsys-async: --backend trio needs trio: pip install 'evsys-async[trio]'", file=err)
        return EXIT_USAGE
    config = _load(args.config, args)
    if isinstance(config, ExperimentConfig):
        return _run_experiment(config, args.backend, out, err)
    loop = build_loop(config)
    tracker = _EvalTracker(_watched_metric(config))

    async def main() -> LoopArtifacts:
        # the summary's eval tracker is a plain subscriber of a bus the CLI owns,
        # not one of the run's callbacks: it stays out of the report and the manifest
        async with EventBus(close_timeout=loop.drain_timeout, batch_delay=loop.batch_delay) as bus:
            bus.subscribe(tracker, events=(EvalEnded,), name="evsys-cli:evals")
            loop.bus = bus
            return await loop.run()

    def on_signal(signum: int) -> None:
        print(
            f"\nevsys-async: {signal_name(signum)} received: stopping after the shutdown "
            "(send it again to exit at once)",
            file=err,
            flush=True,
        )

    code = EXIT_OK
    failure: BaseException | None = None
    try:
        run_with_signals(main, backend=args.backend, on_signal=on_signal)
    except Interrupted as exc:
        code = exc.exit_code
    except KeyboardInterrupt:  # raised by the step or a hook, not a signal: shut down
        code = 130
    except SystemExit as exc:  # likewise: its code, after the shutdown
        code = exc.code if isinstance(exc.code, int) else EXIT_FAILED
    except Exception as exc:
        failure = exc
        code = EXIT_FAILED
    result = loop.artifacts
    if failure is not None:
        kept = result.run_dir / "error.txt" if result is not None else None
        where = f" (kept in {kept})" if kept is not None and kept.is_file() else ""
        print(user_traceback(failure).rstrip(), file=err)
        print(f"evsys-async: the run failed: {describe(failure)}{where}", file=err, flush=True)
    if result is not None:
        _print_summary(result, tracker, out, requested=config.name)
        if code == EXIT_OK and result.status == "failed":
            code = EXIT_FAILED
    return code


def _run_experiment(config: ExperimentConfig, backend: str, out: TextIO, err: TextIO) -> int:
    experiment = build_experiment(config)
    try:
        result: ExperimentResult = run_with_signals(experiment.run, backend=backend)
    except Interrupted as exc:
        print(f"experiment {config.name}: interrupted by {signal_name(exc.signum)}", file=out)
        return exc.exit_code
    print(f"experiment {config.name}: {len(result.arms)} arm(s) x {config.repeats}", file=out)
    failed = False
    for name, arm in result.arms.items():
        statuses = ", ".join(r.status for r in arm.runs)
        failed |= any(r.status == "failed" for r in arm.runs)
        means = " ".join(f"{k}={fmt_value(v)}" for k, v in arm.mean.items())
        print(f"  {name}: [{statuses}] {means}", file=out)
    if result.success_metric:
        print(f"best arm by {result.success_metric}: {result.best_arm}", file=out)
    print(f"files: {experiment.output_dir}", file=out)
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_validate(args: argparse.Namespace, out: TextIO) -> int:
    config = load_config(args.config)
    if isinstance(config, ExperimentConfig):
        print(
            f"ok: {args.config}: experiment {config.name!r}, arms {', '.join(config.arms)}, "
            f"{config.repeats} repeat(s), {config.run.num_steps} steps each",
            file=out,
        )
    else:
        print(
            f"ok: {args.config}: run {config.name!r}, {config.num_steps} steps of "
            f"{config.step!r}, {len(config.evaluators)} evaluator(s), "
            f"{len(config.callbacks)} callback(s); files go to "
            f"{Path(config.output_dir) / config.name}/ (or {config.name}-1, ... if it holds "
            "an earlier run's files)",
            file=out,
        )
    return EXIT_OK


def _cmd_list(kinds: Mapping[str, type], what: str, out: TextIO) -> int:
    print(f"{len(kinds)} {what} kind(s):", file=out)
    for name, cls in kinds.items():
        doc = " ".join((inspect.getdoc(cls) or "").split("\n\n", 1)[0].split())
        print(f"\n{name}  ({cls.__module__}.{cls.__qualname__})", file=out)
        if doc:
            print(f"  {doc}", file=out)
        fields = _fields(cls)
        if not fields:
            print("  (no params)", file=out)
        for field, type_, default in fields:
            print(f"  {field}: {type_}{default}", file=out)
    return EXIT_OK


def _fields(cls: type) -> list[tuple[str, str, str]]:
    config = getattr(cls, "Config", None)
    rows: list[tuple[str, str, str]] = []
    if config is not None:
        for f in msgspec.structs.fields(config):
            if f.default is not msgspec.NODEFAULT:
                default = f" = {f.default!r}"
            elif f.default_factory is not msgspec.NODEFAULT:
                default = f" = {f.default_factory()!r}"
            else:
                default = "  (required)"
            rows.append((f.name, _type_name(f.type), default))
        return rows
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:  # type: ignore[misc]
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        type_ = p.annotation if p.annotation is not p.empty else "Any"
        default = f" = {p.default!r}" if p.default is not p.empty else "  (required)"
        rows.append((p.name, _type_name(type_), default))
    return rows


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type) and not getattr(tp, "__args__", None):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")


# -- replay ----------------------------------------------------------------------------


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


def _add_replay_parser(sub: Any, common: argparse.ArgumentParser) -> None:
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


def _cmd_replay(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        print("evsys-async: --backend trio needs trio: pip install 'evsys-async[trio]'", file=err)
        return EXIT_USAGE
    callbacks = load_callbacks(args.callbacks)

    async def main() -> ReplayReport:
        return await replay(
            args.source,
            callbacks,
            only=args.only,
            speed=args.speed,
            skip_bad=args.skip_bad,
            output_dir=args.output_dir,
        )

    def on_signal(signum: int) -> None:
        print(
            f"\nevsys-async: {signal_name(signum)} received: stopping after the callbacks close "
            "(send it again to exit at once)",
            file=err,
            flush=True,
        )

    try:
        report: ReplayReport = run_with_signals(main, backend=args.backend, on_signal=on_signal)
    except Interrupted as exc:
        return exc.exit_code
    except EventDecodeError as exc:
        print(f"evsys-async: bad event log: {exc}", file=err)
        return EXIT_USAGE
    except (OSError, ValueError) as exc:  # a missing log, a bad --only
        text = str(exc)
        print(f"evsys-async: {'' if text.startswith('replay:') else 'replay: '}{text}", file=err)
        return EXIT_USAGE
    _print_replay(report, out)
    return EXIT_OK if report.ok else EXIT_FAILED


def _print_replay(report: ReplayReport, out: TextIO) -> None:
    counts = f"{report.events_read:,} events"
    if report.events_filtered:
        counts += f" ({report.events_published:,} published, {report.events_filtered:,} left out)"
    lines = ["", f"replayed {counts} from {report.source} in {report.seconds:.2f} s"]
    if report.segments > 1:
        lines.append(f"resumed runs: {report.segments - 1} resume boundary(ies) replayed as such")
    for name, close in report.only_unmatched.items():
        hint = f" — did you mean {close!r}?" if close else ""
        lines.append(f"--only {name}: no event of this type in the log{hint}")
    for kind, n in sorted(report.unknown_types.items()):
        lines.append(f"unknown event type {kind!r} ({n:,}): delivered to on_event as UnknownEvent")
    for skipped in report.skipped:
        lines.append(f"skipped line {skipped.line}: {skipped.reason}")
    if report.run_dir is not None:
        run_dir = report.run_dir
        files = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        lines.append(f"files: {run_dir}/ ({', '.join(files) or 'none'})")
    if report.callback_report:
        lines.append("callbacks:")
        width = max(len(n) for n in report.callback_report)
        for name, h in report.callback_report.items():
            lines.append(f"  {name:<{width}}  {_health(h)}")
    print("\n".join(lines), file=out, flush=True)


# -- tail and consume -------------------------------------------------------------------


def _cmd_tail(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from ..consume import tail

    async def main() -> Any:
        return await tail(
            args.url,
            args.run_key,
            out=out,
            every=args.every,
            rank=args.rank,
            world_size=args.world_size,
            start="$" if args.from_now else "0",
        )

    try:
        result = run_with_signals(main, backend=args.backend)
    except Interrupted as exc:
        return exc.exit_code
    ok = result.ended and all(e.status in ("completed", "stopped") for e in result.ended.values())
    return EXIT_OK if ok else EXIT_FAILED


def _cmd_consume(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from .._util.secrets import redact_url
    from ..consume import consume

    callbacks = load_callbacks(args.callbacks)

    async def main() -> Any:
        return await consume(
            args.url,
            args.run_key,
            group=args.group,
            callbacks=callbacks,
            output_dir=args.output_dir,
            consumer=args.consumer,
            rank=args.rank,
            world_size=args.world_size,
            claim_after=args.claim_after,
        )

    try:
        result = run_with_signals(main, backend=args.backend)
    except Interrupted as exc:
        return exc.exit_code
    lines = [
        f"consumed {result.published} events of run {args.run_key} from "
        f"{redact_url(args.url)} (group {args.group})"
        + (f", resumed at step {result.resumed_at + 1}" if result.resumed_at is not None else ""),
    ]
    for rank, ended in sorted(result.ended.items()):
        who = f"rank {rank}" if len(result.ended) > 1 else "the run"
        reason = f": {ended.stop_reason}" if ended.stop_reason else ""
        lines.append(f"{who}: {ended.status} after {ended.steps_completed} steps{reason}")
    run_dir = result.run_dir
    files = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    lines.append(f"files: {run_dir}/ ({', '.join(files) or 'none'})")
    bad = False
    if result.callback_report:
        lines.append("callbacks:")
        width = max(len(n) for n in result.callback_report)
        for name, h in result.callback_report.items():
            bad |= bool(h.failed or h.stuck or h.pending)
            lines.append(f"  {name:<{width}}  {_health(h)}")
    print("\n".join(lines), file=out, flush=True)
    return EXIT_FAILED if bad else EXIT_OK


# -- the summary -----------------------------------------------------------------------


class _EvalTracker:
    """Records each eval's metrics for the summary (an ``async`` bus handler: no thread)."""

    def __init__(self, watched: tuple[str, str, str | None] | None) -> None:
        #: (metric, mode, eval_name) that the summary calls "best"
        self.watched = watched
        self.best: dict[str, tuple[int, float]] = {}
        self._keys: dict[str, tuple[str, str]] = {}

    async def __call__(self, event: EvalEnded) -> None:
        for key, value in event.metrics.items():
            full = eval_metric_name(event.eval_name, key)
            self._keys[full] = (event.eval_name, key)
            if math.isnan(value):
                continue
            old = self.best.get(full)
            lower = self._lower_is_better(key)
            if old is None or (value < old[1] if lower else value > old[1]):
                self.best[full] = (event.step, value)

    def _lower_is_better(self, key: str) -> bool:
        if self.watched is not None and self.watched[0] == key:
            return self.watched[1] == "min"
        return any(word in key.lower() for word in ("loss", "err", "perplexity"))

    def headline(self) -> str | None:
        """``val/pass_rate = 0.9420 (max, step 120)`` for the watched or first metric:
        named as in the files, the value as the progress line prints it, the step
        counted from 1."""
        if not self.best:
            return None
        chosen = next(iter(self.best))
        if self.watched is not None:
            metric, _, eval_name = self.watched
            for full in self.best:
                e, k = self._keys[full]
                if k == metric and (eval_name is None or e == eval_name):
                    chosen = full
                    break
        step, value = self.best[chosen]
        mode = "min" if self._lower_is_better(self._keys[chosen][1]) else "max"
        return f"{chosen} = {fmt_value(value)} ({mode}, step {step + 1})"


def _watched_metric(config: RunConfig) -> tuple[str, str, str | None] | None:
    for spec in config.callbacks:
        if spec.kind == "early_stopping" and "metric" in spec.params:
            params = spec.params
            return str(params["metric"]), str(params.get("mode", "max")), params.get("eval_name")
    return None


def _health(h: CallbackHealth) -> str:
    """``ok (212 events)``, ``ok (113 events, 99 coalesced (by design))``, ``off: ...``,
    or what went wrong."""
    forced_drops = h.dropped - h.coalesced
    problems = [
        label
        for label, bad in (
            (f"{h.failed} failed", h.failed),
            (f"{forced_drops} dropped", forced_drops),
            (f"{h.pending} left unhandled", h.pending),
            ("stuck", h.stuck),
            (f"{h.control_timeouts} control timeouts", h.control_timeouts),
        )
        if bad
    ]
    counts = f"{h.delivered} events"
    if h.coalesced:
        counts += f", {h.coalesced} coalesced (by design)"  # Latest keeps the newest
    if h.disabled:
        problems.insert(0, f"off: {h.disabled}")
    return f"{'; '.join(problems) or 'ok'} ({counts})"


def _print_summary(
    artifacts: LoopArtifacts, tracker: _EvalTracker, out: TextIO, *, requested: str
) -> None:
    lines = [
        "",
        f"status: {artifacts.status} — {artifacts.steps_completed} of "
        f"{artifacts.total_requested_steps} steps in {artifacts.train_seconds:.2f} s "
        f"(shutdown {artifacts.drain_seconds:.2f} s)",
    ]
    if artifacts.stop_reason:
        lines.append(f"stop reason: {artifacts.stop_reason}")
    if artifacts.error:
        lines.append(f"error: {artifacts.error}")
    headline = tracker.headline()
    lines.append(f"best eval: {headline}" if headline else "best eval: (no evals ran)")
    run_dir = artifacts.run_dir
    files = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    lines.append(f"files: {run_dir}/ ({', '.join(files) or 'none'})")
    if run_dir.name != requested:
        lines.append(
            f"  (a new run dir: {run_dir.parent / requested}/ holds another run's files; "
            "--overwrite reuses it)"
        )
    report = artifacts.callback_report
    if report:
        lines.append("callbacks:")
        width = max(len(n) for n in report)
        for name, h in report.items():
            lines.append(f"  {name:<{width}}  {_health(h)}")
    print("\n".join(lines), file=out, flush=True)


# -- entry points ----------------------------------------------------------------------


def _log_level(args: argparse.Namespace) -> int:
    """``--log-level``, else ``-v``/``-vv``, else ``$EVSYS_LOG_LEVEL``, else WARNING.

    Raises ConfigError for a bad ``$EVSYS_LOG_LEVEL`` (argparse checks the option).
    """
    name: str | None = getattr(args, "log_level", None)
    verbose = int(getattr(args, "verbose", 0) or 0)
    if name is None and verbose:
        name = "INFO" if verbose == 1 else "DEBUG"
    if name is None and os.environ.get(LOG_LEVEL_ENV, "").strip():
        try:
            name = _level_name(os.environ[LOG_LEVEL_ENV])
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"${LOG_LEVEL_ENV}: {exc}") from None
    level: int = getattr(logging, name or "WARNING")
    return level


def _setup_logging(level: int, err: TextIO) -> None:
    """Records of the ``evsys_async`` logger at ``level`` and up reach stderr (tracebacks
    included, from ``exc_info``); other libraries' loggers stay at WARNING."""
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(err)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.WARNING)
    logging.getLogger("evsys_async").setLevel(level)


def run_cli(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command line; return the exit code (argparse errors exit with 2 themselves)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = _parser().parse_args(argv)
    try:
        _setup_logging(_log_level(args), err)
        if args.command == "run":
            return _cmd_run(args, out, err)
        if args.command == "validate":
            return _cmd_validate(args, out)
        if args.command == "replay":
            return _cmd_replay(args, out, err)
        if args.command == "callbacks":
            return _cmd_list(list_callbacks(), "callback", out)
        if args.command == "tail":
            return _cmd_tail(args, out, err)
        if args.command == "consume":
            return _cmd_consume(args, out, err)
        return _cmd_list(list_evaluators(), "evaluator", out)
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


class _ClosedPipeSafe:
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

    def writelines(self, lines: Any) -> None:
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


def main(argv: Sequence[str] | None = None) -> None:
    """The ``evsys-async`` script: exits with :func:`run_cli`'s code."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)  # progress lines reach a pipe as they happen
    sys.stdout = cast(TextIO, _ClosedPipeSafe(sys.stdout))
    sys.stderr = cast(TextIO, _ClosedPipeSafe(sys.stderr))
    code = run_cli(argv)
    sys.stdout.flush()
    sys.exit(code)
