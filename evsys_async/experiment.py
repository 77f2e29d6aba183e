"""Experiment: several runs (arms x repeats) under the experiment-scope hooks.

Order of hooks, as in the original system (``max_concurrency=1``)::

    on_experiment_start(ctx)
      for each arm:   on_group_start(ctx, arm)
        each repeat:  on_run_start(ctx) -> the run's loop-scope hooks -> on_run_end(ctx, run, arm)
    on_experiment_end(ctx, result)

With ``max_concurrency=1`` one set of callback instances sees every arm in
turn under one shared :class:`LogContext` (``ctx.run_key`` and
``ctx.run_config`` change per run). With ``max_concurrency > 1`` the runs of
different arms overlap: loop-scope callbacks are built fresh per run by
``callback_factory`` with their own context copy, and the experiment-scope
hooks go only to the experiment-level ``callbacks``, through ``dispatch``,
one at a time.

Every experiment is a new one: it claims ``<output_dir>/<name>/`` (or
``<name>-1``, ... when that holds an earlier experiment's files; see
``_util/rundir.py`` for runs), so re-running a config never mixes two experiments'
files; ``overwrite=True`` reuses the directory, emptied first.

The records (:class:`Arm`, :class:`RunResult`, :class:`ArmResult`,
:class:`ExperimentResult`) are defined in ``state.py``, below the callbacks
whose hooks get them, and imported from here.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio

from ._util.log import get_logger
from ._util.rundir import claim_run_dir
from .bus import EventBus, Subscription
from .callbacks import Callback, dispatch
from .callbacks._format import eval_metric_name
from .callbacks._hooks import LOOP_HOOKS, overrides
from .errors import describe
from .evaluators import Evaluator
from .events import (
    EvalEnded,
    ExperimentEnded,
    ExperimentStarted,
    GroupStarted,
    RunEnded,
    RunStarted,
)
from .loop import TrainingLoop
from .state import Arm, ArmResult, ExperimentResult, LogContext, RunResult

__all__ = ["Arm", "ArmResult", "Experiment", "ExperimentResult", "RunResult"]

_log = get_logger()


class Experiment:
    """Runs every arm ``repeats`` times and picks the best arm.

    ``success_metric`` names an eval metric as it is named in the files
    (``"val/<metric>"`` for the eval named ``val``, ``"val/<eval_name>/<metric>"``
    for another; or just ``"<metric>"``); ``mode`` says whether higher or lower is better.
    ``loop_options`` go to each :class:`TrainingLoop` (``eval_mode``,
    ``drain_timeout``, ...). A run that fails is recorded and the experiment
    goes on; cancellation propagates after the run in progress shut down.
    """

    def __init__(
        self,
        name: str,
        arms: Sequence[Arm],
        *,
        num_steps: int,
        repeats: int = 1,
        output_dir: str | os.PathLike[str] = "runs",
        callbacks: Sequence[Callback] | None = None,
        callback_factory: Callable[[], Sequence[Callback]] | None = None,
        evaluators: Sequence[Evaluator] | None = None,
        success_metric: str | None = None,
        mode: Literal["max", "min"] = "max",
        max_concurrency: int = 1,
        base_seed: int = 0,
        ctx: LogContext | None = None,
        loop_options: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        if not arms:
            raise ValueError("Experiment: give at least one Arm")
        names = [a.name for a in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"Experiment: arm names must be unique, got {names}")
        if repeats < 1:
            raise ValueError(f"Experiment: repeats must be >= 1, got {repeats}")
        if max_concurrency < 1:
            raise ValueError(f"Experiment: max_concurrency must be >= 1, got {max_concurrency}")
        if mode not in ("max", "min"):
            raise ValueError(f"Experiment: mode must be 'max' or 'min', got {mode!r}")
        self.name = name
        self.arms = list(arms)
        self.num_steps = num_steps
        self.repeats = repeats
        self._parent_dir = Path(output_dir)
        #: ``<output_dir>/<name>``; once ``run()`` starts, the directory it claimed
        self.output_dir = self._parent_dir / name
        self.overwrite = overwrite
        self.callbacks = list(callbacks or ())
        self.callback_factory = callback_factory
        self.evaluators = evaluators
        self.success_metric = success_metric
        self.mode = mode
        self.max_concurrency = max_concurrency
        self.base_seed = base_seed
        self.ctx = ctx if ctx is not None else LogContext(output_dir=self.output_dir)
        self.loop_options = dict(loop_options or {})
        self._last_evals: dict[str, dict[str, float]] = {}
        self._recorder: Subscription | None = None
        if max_concurrency > 1 and callback_factory is None:
            loop_scope = [
                type(cb).__name__
                for cb in self.callbacks
                if any(overrides(cb, hook) for hook, _ in LOOP_HOOKS.values())
            ]
            if loop_scope:
                _log.warning(
                    "with max_concurrency > 1 loop-scope hooks of experiment-level callbacks "
                    "do not run; pass callback_factory to build them per run",
                    callbacks=loop_scope,
                )
        self._hook_lock: anyio.Lock | None = None

    async def run(self) -> ExperimentResult:
        """Run every arm and repeat; return the results (after every run's shutdown)."""
        self._hook_lock = anyio.Lock()
        _, self.output_dir = claim_run_dir(self._parent_dir, self.name, overwrite=self.overwrite)
        self.ctx.output_dir = self.output_dir  # the runs' files go inside it
        self.ctx.config.setdefault("experiment", self.name)
        async with EventBus() as bus:
            self._recorder = bus.subscribe(
                self._record_eval, events=(EvalEnded,), name="experiment-evals"
            )
            bus.publish(ExperimentStarted(name=self.name))
            await self._hook("on_experiment_start", self.ctx)
            runs: dict[str, list[RunResult]] = {a.name: [] for a in self.arms}
            if self.max_concurrency == 1:
                for arm in self.arms:
                    await self._run_arm(bus, arm, runs[arm.name])
            else:
                limiter = anyio.CapacityLimiter(self.max_concurrency)
                async with anyio.create_task_group() as tg:
                    for arm in self.arms:
                        tg.start_soon(self._run_arm, bus, arm, runs[arm.name], limiter)
            result = self._result(runs)
            bus.publish(ExperimentEnded(result=result.to_dict()))
            await self._hook("on_experiment_end", self.ctx, result)
        return result

    async def _hook(self, hook: str, *args: Any, **kwargs: Any) -> None:
        assert self._hook_lock is not None
        async with self._hook_lock:  # one at a time, in list order
            await dispatch(self.callbacks, hook, *args, **kwargs)

    async def _record_eval(self, event: EvalEnded) -> None:
        last = self._last_evals.setdefault(event.run_key, {})
        for key, value in event.metrics.items():
            last[eval_metric_name(event.eval_name, key)] = value

    async def _run_arm(
        self,
        bus: EventBus,
        arm: Arm,
        out: list[RunResult],
        limiter: anyio.CapacityLimiter | None = None,
    ) -> None:
        bus.publish(GroupStarted(group_name=arm.name))
        await self._hook("on_group_start", self.ctx, arm.name)
        for repeat in range(self.repeats):
            if limiter is None:
                out.append(await self._run_one(bus, arm, repeat))
            else:
                async with limiter:
                    out.append(await self._run_one(bus, arm, repeat))

    async def _run_one(self, bus: EventBus, arm: Arm, repeat: int) -> RunResult:
        run_key = f"{arm.name}-r{repeat}" if self.repeats > 1 else arm.name
        concurrent = self.max_concurrency > 1
        ctx = copy.copy(self.ctx) if concurrent else self.ctx
        ctx.run_key = run_key
        ctx.group_name = arm.name
        ctx.run_config = {
            **arm.params,
            "arm": arm.name,
            "repeat": repeat,
            "seed": self.base_seed + repeat,
        }
        if concurrent:
            callbacks = list(self.callback_factory()) if self.callback_factory else []
            ctx.ids = dict(self.ctx.ids)
            ctx.extras = dict(self.ctx.extras)
        else:
            callbacks = self.callbacks
        bus.publish(RunStarted(run_key=run_key, arm=arm.name, repeat=repeat))
        if not concurrent:
            await self._hook("on_run_start", ctx)
        loop = TrainingLoop(
            arm.step,
            num_steps=self.num_steps,
            output_dir=self.output_dir,
            run_key=run_key,
            evaluators=arm.evaluators if arm.evaluators is not None else self.evaluators,
            callbacks=callbacks,
            bus=bus,
            ctx=ctx,
            **self.loop_options,
        )
        error: str | None = None
        try:
            artifacts = await loop.run()
        except Exception as exc:  # the run failed; the experiment goes on
            artifacts = loop.artifacts  # type: ignore[assignment]
            error = describe(exc)
        # the evals of this run are recorded; other arms' callbacks are not waited for
        assert self._recorder is not None
        await bus.drain(
            timeout=self.loop_options.get("drain_timeout", 60.0), subscriptions=[self._recorder]
        )
        run_key = loop.run_key  # the key its run dir was claimed under
        result = RunResult(
            run_key=run_key,
            arm=arm.name,
            repeat=repeat,
            status=artifacts.status if artifacts is not None else "failed",
            steps_completed=artifacts.steps_completed if artifacts is not None else 0,
            metrics=dict(self._last_evals.get(run_key, {})),
            artifacts=artifacts,
            error=error,
        )
        bus.publish(RunEnded(run_key=run_key, arm=arm.name, result=result.to_dict()))
        if not concurrent:
            await self._hook("on_run_end", ctx, result, arm)
        return result

    def _result(self, runs: dict[str, list[RunResult]]) -> ExperimentResult:
        arms: dict[str, ArmResult] = {}
        for name, results in runs.items():
            keys = {k for r in results for k in r.metrics}
            mean = {
                k: statistics.fmean(r.metrics[k] for r in results if k in r.metrics)
                for k in sorted(keys)
            }
            arms[name] = ArmResult(arm=name, runs=results, mean=mean)
        return ExperimentResult(
            name=self.name,
            arms=arms,
            success_metric=self.success_metric,
            best_arm=self._best(arms),
        )

    def _best(self, arms: dict[str, ArmResult]) -> str | None:
        metric = self.success_metric
        if metric is None:
            return None
        best: str | None = None
        best_value = -math.inf if self.mode == "max" else math.inf
        for name, arm in arms.items():
            value = arm.mean.get(metric)
            if value is None:  # "acc" matches "<eval>/acc"
                matches = [v for k, v in arm.mean.items() if k.rsplit("/", 1)[-1] == metric]
                value = matches[0] if matches else None
            if value is None or math.isnan(value):
                continue
            if (value > best_value) if self.mode == "max" else (value < best_value):
                best, best_value = name, value
        return best
