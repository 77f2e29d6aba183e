"""``evsys-async run``: a config (or the demo) run to its end, then its summary.

What this module promises: the command-line overrides (``--output-dir``,
``--num-steps``, ``--overwrite``) are applied to the loaded config, never to
the file; ``--resume`` continues a run in its own directory from the step after
its last checkpoint, as ``run(start_step=k)`` does (:func:`resume_point`),
or refuses with one line saying why; the run's own files are complete however
it ends (a signal stops it after its shutdown); the exit code says how it ended
(0 completed or stopped, 1 failed, 2 bad config or arguments, 130/143 a
signal). Blocks until the run has ended.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
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

__all__ = ["cmd_run", "resume_point"]


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


def resume_point(run_dir: Path, num_steps: int) -> int:
    """The step a resume of ``run_dir`` starts at (0-based): the first one the last
    checkpoint in its ``checkpoints.jsonl`` does not hold (its ``resume_step``; an
    ``interrupted`` checkpoint is saved during the step that failed, which it does
    not hold), as ``run(start_step=k)`` then takes it.

    Raises :class:`ConfigError` (one line: the place and the fix) when the
    directory or its checkpoints are missing, or nothing is left to run.
    """
    if not run_dir.is_dir():
        raise ConfigError(
            f"--resume: no run directory {run_dir}; give the directory of the run to continue "
            "(evsys-async run CONFIG --resume runs/<name>)"
        )
    log = run_dir / "checkpoints.jsonl"
    last: int | None = None
    if log.is_file():
        for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                done = row.get("resume_step", row.get("step", -2) + 1)
            except (ValueError, AttributeError, TypeError):
                continue  # a torn last line: the checkpoint before it stands
            if isinstance(done, int) and done >= 0:
                last = done - 1
    if last is None:
        raise ConfigError(
            f"--resume: {run_dir} has no checkpoint to resume from ({log.name} is "
            f"{'empty' if log.is_file() else 'missing'}); a run records one when its config "
            "has `checkpoint:` (every `save_every` steps, and at its end), or give "
            "--start-step K"
        )
    if last + 1 >= num_steps:
        raise ConfigError(
            f"--resume: {run_dir}'s last checkpoint is after step {last + 1} of {num_steps}: "
            f"nothing is left to run; give --num-steps N (N > {last + 1}) to train on"
        )
    return last + 1


def _resumed(config: RunConfig, args: argparse.Namespace) -> tuple[RunConfig, int]:
    """The config pointed at the run dir to continue, and the step to start at."""
    if args.resume is None:
        if args.start_step is not None:
            raise ConfigError("--start-step K goes with --resume [RUN_DIR]")
        return config, 0
    if config.overwrite:
        raise ConfigError(
            "--resume continues a run in its directory; --overwrite (or overwrite: true) would "
            "empty it first: give one of them"
        )
    run_dir = (
        Path(args.resume).expanduser()
        if args.resume
        else Path(config.output_dir).expanduser() / config.name
    )
    config = msgspec.structs.replace(config, output_dir=str(run_dir.parent), name=run_dir.name)
    if args.start_step is not None:
        if not run_dir.is_dir():
            raise ConfigError(f"--resume: no run directory {run_dir}")
        if args.start_step > config.num_steps:
            raise ConfigError(
                f"--start-step {args.start_step} is past num_steps={config.num_steps}; give "
                f"--num-steps N (N >= {args.start_step}) to train on"
            )
        return config, args.start_step - 1
    return config, resume_point(run_dir, config.num_steps)


def _config_and_start(
    args: argparse.Namespace, err: TextIO
) -> tuple[RunConfig | ExperimentConfig, int]:
    """The config with the command line's overrides, and the step the run starts at
    (``> 0``: ``--resume``, said on ``err``)."""
    resume = getattr(args, "resume", None)
    if resume and args.config is None and Path(resume).is_file():
        # `run --resume run.yaml`: argparse gave the config to --resume
        args.config, args.resume = Path(resume), ""
    config = _load(args.config, args)
    if isinstance(config, ExperimentConfig):
        if args.resume is not None or args.start_step is not None:
            raise ConfigError(
                "--resume continues one run; an experiment's runs are resumed one by one from "
                "Python (TrainingLoop.run(start_step=k))"
            )
        return config, 0
    config, start_step = _resumed(config, args)
    if start_step:
        print(
            f"resuming {Path(config.output_dir) / config.name} at step {start_step + 1} "
            f"of {config.num_steps}",
            file=err,
            flush=True,
        )
    return config, start_step


def cmd_run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``evsys-async run [CONFIG]``: run the config (or the demo) under the signal
    handlers, then print the summary; returns the exit code. The first SIGINT or
    SIGTERM stops the run after its shutdown, the second exits at once."""
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        print("evsys-async: --backend trio needs trio: pip install 'evsys-async[trio]'", file=err)
        return EXIT_USAGE
    config, start_step = _config_and_start(args, err)
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
            return await loop.run(start_step=start_step)

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
