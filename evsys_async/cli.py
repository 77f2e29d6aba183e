"""``evsys-async``: run a config (or the demo), validate a config, list the kinds.

::

    evsys-async run [CONFIG] [--backend asyncio|trio] [--output-dir DIR] [--num-steps N]
    evsys-async validate CONFIG
    evsys-async callbacks
    evsys-async evaluators

Exit codes (DESIGN rule 24): 0 completed or stopped, 1 failed, 2 bad config
or arguments, 130 SIGINT, 143 SIGTERM. This is the only module that exits
the process; everything else raises.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TextIO

import msgspec

from ._signals import Interrupted, run_with_signals
from ._version import __version__
from .callbacks.base import Callback
from .callbacks.registry import list_callbacks
from .config import (
    ExperimentConfig,
    RunConfig,
    build_experiment,
    build_loop,
    load_config,
)
from .errors import ConfigError, describe
from .evaluators import list_evaluators
from .experiment import ExperimentResult
from .state import LoopArtifacts, LoopState

__all__ = ["main", "run_cli"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# -- argument parsing ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evsys-async",
        description="Run training loops from config files; callbacks are isolated subscribers "
        "of an async event bus.",
        epilog="Exit codes: 0 completed or stopped, 1 failed, 2 bad config or arguments, "
        "130 interrupted (SIGINT), 143 terminated (SIGTERM).",
    )
    parser.add_argument("--version", action="version", version=f"evsys-async {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
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
    validate = sub.add_parser(
        "validate",
        help="check a config without running it",
        description="Check CONFIG completely without running it: structure and types, the "
        "dotted-path imports, every callback's and evaluator's kind and params.",
    )
    validate.add_argument("config", type=Path, help="a .yaml/.yml, .toml or .json file")
    sub.add_parser(
        "callbacks",
        help="list the callback kinds with their params",
        description="List every registered callback kind (built-ins and entry points) "
        "with its params: name, type and default.",
    )
    sub.add_parser(
        "evaluators",
        help="list the evaluator kinds with their params",
        description="List every registered evaluator kind with its params.",
    )
    return parser


# -- commands --------------------------------------------------------------------------


def _load(path: Path | None, args: argparse.Namespace) -> RunConfig | ExperimentConfig:
    if path is None:
        from .demo import demo_config

        config: RunConfig | ExperimentConfig = demo_config()
    else:
        config = load_config(path)
    run = config.run if isinstance(config, ExperimentConfig) else config
    changes: dict[str, Any] = {}
    if getattr(args, "output_dir", None) is not None:
        changes["output_dir"] = str(args.output_dir)
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
        print("evsys-async: --backend trio needs trio: pip install trio", file=err)
        return EXIT_USAGE
    config = _load(args.config, args)
    if isinstance(config, ExperimentConfig):
        return _run_experiment(config, args.backend, out, err)
    loop = build_loop(config)
    tracker = _EvalTracker(_watched_metric(config))
    loop.callbacks.append(tracker)

    def on_signal(signum: int) -> None:
        print(
            f"\nevsys-async: {_signame(signum)} received: stopping after the shutdown "
            "(send it again to exit at once)",
            file=err,
            flush=True,
        )

    code = EXIT_OK
    try:
        artifacts = run_with_signals(loop.run, backend=args.backend, on_signal=on_signal)
    except Interrupted as exc:
        code = exc.exit_code
    except Exception as exc:
        print(f"evsys-async: the run failed: {describe(exc)}", file=err)
        code = EXIT_FAILED
    result = loop.artifacts
    if result is not None:
        _print_summary(result, tracker, out)
        artifacts = result
        if code == EXIT_OK and artifacts.status == "failed":
            code = EXIT_FAILED
    return code


def _run_experiment(config: ExperimentConfig, backend: str, out: TextIO, err: TextIO) -> int:
    experiment = build_experiment(config)
    try:
        result: ExperimentResult = run_with_signals(experiment.run, backend=backend)
    except Interrupted as exc:
        print(f"experiment {config.name}: interrupted by {_signame(exc.signum)}", file=out)
        return exc.exit_code
    print(f"experiment {config.name}: {len(result.arms)} arm(s) x {config.repeats}", file=out)
    failed = False
    for name, arm in result.arms.items():
        statuses = ", ".join(r.status for r in arm.runs)
        failed |= any(r.status == "failed" for r in arm.runs)
        means = " ".join(f"{k}={v:.4f}" for k, v in arm.mean.items())
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
            f"{Path(config.output_dir) / config.name}",
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


# -- the summary -----------------------------------------------------------------------


class _EvalTracker(Callback):
    """Records each eval's metrics for the summary (an ``async`` hook: no thread)."""

    name: ClassVar[str] = "_eval_tracker"

    def __init__(self, watched: tuple[str, str, str | None] | None) -> None:
        #: (metric, mode, eval_name) that the summary calls "best"
        self.watched = watched
        self.last: dict[str, tuple[int, float]] = {}
        self.best: dict[str, tuple[int, float]] = {}

    async def on_eval(
        self, state: LoopState, step_idx: int, eval_name: str, metrics: dict[str, float]
    ) -> None:
        for key, value in metrics.items():
            full = f"{eval_name}/{key}"
            self.last[full] = (step_idx, value)
            old = self.best.get(full)
            lower = self._lower_is_better(eval_name, key)
            if math.isnan(value):
                continue
            if old is None or (value < old[1] if lower else value > old[1]):
                self.best[full] = (step_idx, value)

    def _lower_is_better(self, eval_name: str, key: str) -> bool:
        if self.watched is not None and self.watched[0] == key:
            return self.watched[1] == "min"
        return any(word in key.lower() for word in ("loss", "err", "perplexity"))

    def headline(self) -> str | None:
        """``val/pass_rate = 0.9420 (max, step 120)`` for the watched or first metric."""
        if not self.best:
            return None
        chosen = next(iter(self.best))
        if self.watched is not None:
            metric, _, eval_name = self.watched
            for full in self.best:
                e, _, k = full.rpartition("/")
                if k == metric and (eval_name is None or e == eval_name):
                    chosen = full
                    break
        step, value = self.best[chosen]
        mode = "min" if self._lower_is_better(*chosen.rsplit("/", 1)) else "max"
        return f"{chosen} = {value:.4f} ({mode}, step {step + 1})"


def _watched_metric(config: RunConfig) -> tuple[str, str, str | None] | None:
    for spec in config.callbacks:
        if spec.kind == "early_stopping" and "metric" in spec.params:
            params = spec.params
            return str(params["metric"]), str(params.get("mode", "max")), params.get("eval_name")
    return None


def _print_summary(artifacts: LoopArtifacts, tracker: _EvalTracker, out: TextIO) -> None:
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
    report = {
        k: v for k, v in (artifacts.callback_report or {}).items() if not k.startswith("_EvalTr")
    }
    if report:
        lines.append("callbacks:")
        width = max(len(n) for n in report)
        for name, h in report.items():
            problems = [
                label
                for label, bad in (
                    (f"{h.failed} failed", h.failed),
                    (f"{h.dropped} dropped", h.dropped),
                    (f"{h.pending} left unhandled", h.pending),
                    ("stuck", h.stuck),
                    (f"{h.control_timeouts} control timeouts", h.control_timeouts),
                )
                if bad
            ]
            health = "ok" if not problems else "; ".join(problems)
            lines.append(f"  {name:<{width}}  {health} ({h.delivered} events)")
    print("\n".join(lines), file=out, flush=True)


def _signame(signum: int) -> str:
    import signal

    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# -- entry points ----------------------------------------------------------------------


def run_cli(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command line; return the exit code (argparse errors exit with 2 themselves)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _cmd_run(args, out, err)
        if args.command == "validate":
            return _cmd_validate(args, out)
        if args.command == "callbacks":
            return _cmd_list(list_callbacks(), "callback", out)
        return _cmd_list(list_evaluators(), "evaluator", out)
    except ConfigError as exc:
        print(f"evsys-async: bad config: {exc}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before the signal handlers were installed
        return 130


def main(argv: Sequence[str] | None = None) -> None:
    """The ``evsys-async`` script: exits with :func:`run_cli`'s code."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)  # progress lines reach a pipe as they happen
    sys.exit(run_cli(argv))
