"""Checking a config completely, and building the loop or the experiment it describes.

What this module promises: :func:`check_config` runs everything a run needs
before the run starts -- the dotted-path imports, every callback's, evaluator's,
transport's and the coordinator's kind and params (each callback and evaluator
is built once and dropped; files and connections open only in ``setup``) --
and raises a :class:`~evsys_async.errors.PlacedConfigError` whose path names
the place inside the config (``arms.<arm>.<key>`` when an arm's override is
what is wrong). :func:`build_loop` and :func:`build_experiment` build from a
config the objects a run uses; they import user code, which may block for as
long as its module code does, and never start a run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from .._util.params import explain_validation, validate_params
from ..callbacks.base import Callback
from ..callbacks.registry import build_callbacks
from ..errors import ConfigPath, PlacedConfigError, PlacedMissingExtraError, did_you_mean
from ..evaluators import build_evaluators
from ..experiment import Arm, Experiment
from ..loop import TrainingLoop
from ..state import LogContext
from ._imports import import_object
from ._schema import ARM_FIELDS, AnyConfig, ExperimentConfig, RunConfig
from ._transports import build_coordinator, build_transports, redacted

__all__ = ["build_experiment", "build_loop", "check_config"]

T = TypeVar("T")


def _arm_run(config: ExperimentConfig, arm: str, overrides: Mapping[str, Any]) -> RunConfig:
    """The base run with an arm's overrides (``params`` merged key by key)."""
    base = msgspec.to_builtins(config.run)
    for key, value in overrides.items():
        if key not in ARM_FIELDS:
            hint = did_you_mean(
                key,
                ARM_FIELDS,
                f"; an arm may override only {', '.join(ARM_FIELDS)} (set the rest under 'run')",
            )
            raise PlacedConfigError(("arms", arm, key), f"cannot override {key!r}{hint}")
        if key == "params" and isinstance(value, Mapping):
            base["params"] = {**base["params"], **value}
        else:
            base[key] = value
    try:
        return msgspec.convert(base, RunConfig)
    except msgspec.ValidationError as exc:
        err = explain_validation(str(exc), RunConfig, base)
        # point at the arm when the bad value came from it
        if err.path and err.path[0] in overrides:
            raise PlacedConfigError(("arms", arm, *err.path), err.detail) from None
        raise PlacedConfigError(("run", *err.path), err.detail) from None


def _prefixed(prefix: ConfigPath, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except PlacedConfigError as exc:
        raise PlacedConfigError((*prefix, *exc.path), exc.detail, kind=exc.kind) from exc
    except PlacedMissingExtraError as exc:
        raise PlacedMissingExtraError((*prefix, *exc.place), exc.detail, kind=exc.kind) from None


def check_step_params(step: object, params: Mapping[str, Any], target: str) -> None:
    """Check a config's ``params`` against the step's ``Config`` (a msgspec Struct
    the step function carries as an attribute, as the demo's does); a step without
    one takes any params. Raises :class:`PlacedConfigError` at ``params.<name>``
    naming the step's params."""
    config = getattr(step, "Config", None)
    if not (isinstance(config, type) and issubclass(config, msgspec.Struct)):
        return
    try:
        validate_params(step, params, ())  # type: ignore[arg-type]
    except PlacedConfigError as exc:
        known = ", ".join(f.name for f in msgspec.structs.fields(config))
        detail = exc.detail.split("; known fields:")[0]
        raise PlacedConfigError(
            exc.path, f"{detail} (step {target!r} takes: {known})", kind=exc.kind
        ) from None


def _check_run(config: RunConfig, prefix: ConfigPath) -> None:
    step = _prefixed(prefix, lambda: import_object(config.step, key="step"))
    _prefixed(prefix, lambda: check_step_params(step, config.params, config.step))
    if config.checkpoint is not None:
        checkpoint = config.checkpoint
        _prefixed(prefix, lambda: import_object(checkpoint, key="checkpoint"))
    _prefixed(prefix, lambda: build_evaluators(config.evaluators, place="evaluators"))
    _prefixed(prefix, lambda: build_callbacks(config.callbacks, place="callbacks"))
    _prefixed(prefix, lambda: build_transports(config.transports, build=False))
    _prefixed(prefix, lambda: build_coordinator(config.coordinator, run_key="", build=False))


def check_config(config: AnyConfig) -> None:
    """Check what a run needs beyond types: imports, kinds, params (each callback
    and evaluator is built once and dropped; files open only in ``setup``).

    Raises :class:`PlacedConfigError` with the path inside the config.
    """
    if isinstance(config, RunConfig):
        _check_run(config, ())
        return
    _check_run(config.run, ("run",))
    for arm, overrides in config.arms.items():
        run = _arm_run(config, arm, overrides)
        if "step" in overrides or "params" in overrides:  # the arm's step takes its params
            step = _prefixed(("arms", arm), partial(import_object, run.step, key="step"))
            _prefixed(("arms", arm), partial(check_step_params, step, run.params, run.step))
        for key in ARM_FIELDS:
            if key in overrides and key != "params":
                if key == "step":
                    _prefixed(("arms", arm), partial(import_object, run.step, key="step"))
                else:
                    _prefixed(("arms", arm), partial(build_evaluators, run.evaluators))
    build_callbacks(config.callbacks, place="callbacks")


def _context(config: RunConfig) -> LogContext:
    return LogContext(
        output_dir=config.output_dir,
        config=redacted(msgspec.to_builtins(config)),
        run_key=config.name,
        run_config={**config.params, "seed": config.seed},
    )


def _loop_options(config: RunConfig) -> dict[str, Any]:
    checkpoint = import_object(config.checkpoint, key="checkpoint") if config.checkpoint else None
    return {
        "save_every": config.save_every,
        "checkpoint": checkpoint,
        "eval_mode": config.eval_mode,
        "eval_timeout": config.eval_timeout,
        "max_evals_in_flight": config.max_evals_in_flight,
        "control_timeout": config.control_timeout,
        "drain_timeout": config.drain_timeout,
        "callback_errors": config.callback_errors,
        "strict": config.strict,
    }


def build_loop(config: RunConfig) -> TrainingLoop:
    """A :class:`TrainingLoop` for ``config``: files in ``<output_dir>/<name>/``.

    Imports the step (and checkpoint) and builds the evaluators and callbacks;
    raises :class:`ConfigError` naming the place for anything wrong.
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"build_loop takes a RunConfig, got {type(config).__name__}")
    step = import_object(config.step, key="step")
    return TrainingLoop(
        step,
        num_steps=config.num_steps,
        output_dir=config.output_dir,
        run_key=config.name,
        evaluators=build_evaluators(config.evaluators),
        callbacks=[*build_callbacks(config.callbacks), *build_transports(config.transports)],
        coordinator=build_coordinator(config.coordinator, run_key=config.name),
        ctx=_context(config),
        overwrite=config.overwrite,
        **_loop_options(config),
    )


def build_experiment(config: ExperimentConfig) -> Experiment:
    """An :class:`Experiment` for ``config``: runs in ``<run.output_dir>/<name>/<arm>[-rN]/``.

    With ``max_concurrency == 1`` one set of callbacks (experiment-level, then
    the run's) sees every arm; above it the run's callbacks are built fresh
    for each run and only the experiment-level ones get the experiment hooks.
    """
    run = config.run
    arms = []
    for name, overrides in config.arms.items():
        arm_run = _arm_run(config, name, overrides)
        arms.append(
            Arm(
                name=name,
                step=_prefixed(("arms", name), partial(import_object, arm_run.step)),
                params=dict(arm_run.params),
                evaluators=(
                    _prefixed(("arms", name), partial(build_evaluators, arm_run.evaluators))
                    if "evaluators" in overrides
                    else None
                ),
            )
        )
    experiment_callbacks = build_callbacks(config.callbacks, place="callbacks")
    concurrent = config.max_concurrency > 1

    def loop_callbacks() -> list[Callback]:
        return [*build_callbacks(run.callbacks), *build_transports(run.transports)]

    run_callbacks = [] if concurrent else _prefixed(("run",), loop_callbacks)
    options = _loop_options(run)
    return Experiment(
        config.name,
        arms,
        num_steps=run.num_steps,
        repeats=config.repeats,
        output_dir=run.output_dir,
        callbacks=[*experiment_callbacks, *run_callbacks],
        callback_factory=loop_callbacks if concurrent else None,
        evaluators=_prefixed(("run",), lambda: build_evaluators(run.evaluators)),
        success_metric=config.success_metric,
        mode=config.mode,
        max_concurrency=config.max_concurrency,
        base_seed=run.seed,
        ctx=LogContext(
            output_dir=Path(run.output_dir) / config.name,
            config=redacted(msgspec.to_builtins(config)),
        ),
        loop_options=options,
        overwrite=run.overwrite,
    )
