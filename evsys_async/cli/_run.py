"""``evsys-async run``: a config (or the demo) run to its end, then its summary.

What this module promises: the command-line overrides (``--output-dir``,
``--num-steps``, ``--overwrite``) are applied to the loaded config, never to
the file; the run's own files are complete however it ends (a signal stops it
after its shutdown); the exit code says how it ended (0 completed or stopped,
1 failed, 130/143 a signal). Blocks until the run has ended.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any, TextIO

import msgspec

from .._util.signals import Interrupted, run_with_signals, signal_name
from .._util.traceback import user_traceback
from ..bus import EventBus
from ..callbacks._format import fmt_value
from ..config import ExperimentConfig, RunConfig, build_experiment, build_loop, load_config
from ..errors import ConfigError, describe
from ..experiment import ExperimentResult
from ..state import LoopArtifacts
from ._stdio import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from ._summary import EvalTracker, print_summary, watched_metric

__all__ = ["cmd_run"]


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
    if getattr(args, "strict", False):
        changes["strict"] = True
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


def cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``evsys-async run [CONFIG]``: run the config (or the demo) under the signal
    handlers, then print the summary; returns the exit code. The first SIGINT or
    SIGTERM stops the run after its shutdown, the second exits at once."""
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        print("evsys-async: --backend trio needs trio: pip install 'evsys-async[trio]'", file=err)
        return EXIT_USAGE
    config = _load(args.config, args)
    if isinstance(config, ExperimentConfig):
        return _run_experiment(config, args.backend, out, err)
    loop = build_loop(config)
    tracker = EvalTracker(watched_metric(config))

    async def main() -> LoopArtifacts:
        # the summary's eval tracker is a plain subscriber of a bus the CLI owns,
        # not one of the run's callbacks: it stays out of the report and the manifest
        async with EventBus(close_timeout=loop.drain_timeout, batch_delay=loop.batch_delay) as bus:
            bus.subscribe(tracker, events=tracker.EVENTS, name="evsys-cli:evals")
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
    except ConfigError as exc:
        if loop.artifacts is None:  # before the run began (its output dir, its key): exit 2
            raise
        failure, code = exc, EXIT_FAILED
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
        print_summary(result, tracker, out, requested=config.name)
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
