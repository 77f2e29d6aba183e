"""``TrainingLoop``'s arguments, checked when it is built and when ``run()`` starts.

Each error names the argument, the problem and the allowed range or the fix
(docs/design.md, "A run"): ``TrainingLoop`` refuses a bad argument before it
claims a run directory or starts a thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..callbacks.base import Callback
from ..coordinator import Coordinator, settle_ranks
from ..evaluators import Evaluator
from ..state import LogContext

__all__ = ["check_distinct", "check_options", "check_steps", "context_of", "ranks_of"]


def check_distinct(callbacks: Sequence[Callback]) -> None:
    """One callback instance subscribes once: twice would interleave its own calls."""
    seen: dict[int, int] = {}
    for i, cb in enumerate(callbacks):
        j = seen.setdefault(id(cb), i)
        if j != i:
            raise ValueError(
                f"TrainingLoop: callbacks[{i}] is the same {type(cb).__name__} instance as "
                f"callbacks[{j}]; pass one instance per subscription (build it twice)"
            )


def context_of(
    ctx: LogContext | None,
    output_dir: str | os.PathLike[str] | None,
    run_key: str,
    config: Mapping[str, Any] | None,
) -> tuple[LogContext, Path, str]:
    """The run's context, output dir and asked-for key; refuses contradictions."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(
            f"TrainingLoop: config must be a mapping of hyperparameters, got {config!r}"
        )
    if ctx is None:
        ctx = LogContext(output_dir=Path(output_dir if output_dir is not None else "runs"))
    else:
        if output_dir is not None and Path(output_dir) != Path(ctx.output_dir):
            raise ValueError(
                f"TrainingLoop: output_dir={str(output_dir)!r} contradicts "
                f"ctx.output_dir={str(ctx.output_dir)!r}; give it once (without output_dir "
                "the loop uses the ctx's)"
            )
        if run_key and ctx.run_key and run_key != ctx.run_key:
            raise ValueError(
                f"TrainingLoop: run_key={run_key!r} contradicts ctx.run_key={ctx.run_key!r}; "
                "give it once"
            )
        if config is not None and ctx.run_config and dict(config) != dict(ctx.run_config):
            raise ValueError(
                "TrainingLoop: config= and ctx.run_config hold different hyperparameters; "
                "give them once (config= is enough for a single run)"
            )
    if config is not None:
        ctx.run_config = dict(config)
    name = config.get("name") if config is not None else None
    key = run_key or ctx.run_key or (name if isinstance(name, str) and name else "") or "run"
    ctx.run_key = key
    return ctx, Path(ctx.output_dir if output_dir is None else output_dir), key


def check_options(
    *,
    step: object,
    num_steps: object,
    save_every: int,
    eval_mode: str,
    callback_errors: str,
    timeouts: dict[str, float],
    max_evals_in_flight: int,
    callbacks: Sequence[Callback],
    evaluators: Sequence[Evaluator],
) -> None:
    """``TrainingLoop``'s arguments, each with an error that names it and its range."""
    if not callable(step):
        raise TypeError(f"TrainingLoop: step must be callable (state, step_idx), got {step!r}")
    check_steps(num_steps, 0)
    if save_every < 0:
        raise ValueError(f"TrainingLoop: save_every must be >= 0 (0 = never), got {save_every}")
    if eval_mode not in ("inline", "background"):
        raise ValueError(
            f"TrainingLoop: eval_mode must be 'inline' or 'background', got {eval_mode!r}"
        )
    if callback_errors not in ("log", "raise"):
        raise ValueError(
            f"TrainingLoop: callback_errors must be 'log' or 'raise', got {callback_errors!r}"
        )
    for name, value in timeouts.items():
        if value <= 0:
            raise ValueError(f"TrainingLoop: {name} must be > 0 seconds, got {value}")
    if max_evals_in_flight < 1:
        raise ValueError(
            f"TrainingLoop: max_evals_in_flight must be >= 1, got {max_evals_in_flight}"
        )
    for i, cb in enumerate(callbacks):
        _check_instance(f"callbacks[{i}]", cb, "build_callbacks")
    check_distinct(callbacks)
    for i, ev in enumerate(evaluators):
        _check_instance(f"evaluators[{i}]", ev, "build_evaluators")
        if not (hasattr(ev, "name") and hasattr(ev, "evaluate")):
            raise TypeError(
                f"TrainingLoop: evaluators[{i}] ({ev!r}) needs `name`, `run_every` and "
                "`async def evaluate(state, step_idx)`"
            )


def ranks_of(
    rank: int | None, world_size: int | None, coordinator: Coordinator | None
) -> tuple[int, int]:
    """This process's rank and the world size, each given once: to the loop or to the
    coordinator (a coordinator given neither takes the loop's), else from the
    launcher's environment (``RANK``/``WORLD_SIZE``, ``SLURM_*``). A coordinator
    with ``bind_ranks`` is told the loop's (docs/distributed.md, "Ranks").

    Raises ``ValueError`` for a contradiction or a rank outside the world.
    """
    try:
        if coordinator is None:
            return settle_ranks((rank, world_size))
        bind = getattr(coordinator, "bind_ranks", None)
        if not callable(bind):  # its rank and world size are its own: agree with them
            return settle_ranks((rank, world_size), (coordinator.rank, coordinator.world_size))
        bind(rank, world_size)
        return coordinator.rank, coordinator.world_size
    except ValueError as exc:
        raise ValueError(f"TrainingLoop: {exc}") from None


def _check_instance(place: str, obj: object, builder: str) -> None:
    """A class or a kind name where an instance belongs: say which and how to fix it."""
    if isinstance(obj, type):
        raise TypeError(
            f"TrainingLoop: {place} is the class {obj.__name__}, not an instance; "
            f"pass {obj.__name__}(...)"
        )
    if isinstance(obj, str | Mapping):
        raise TypeError(
            f"TrainingLoop: {place} is {obj!r}, a config spec; build it first: "
            f"ev.{builder}([{{'kind': ..., 'params': {{...}}}}])"
        )


def check_steps(num_steps: object, start_step: object) -> None:
    """``num_steps`` an int >= 1 and ``start_step`` one of its steps; ``ValueError`` else."""
    if not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not isinstance(start_step, int) or not 0 <= start_step < num_steps:
        raise ValueError(
            f"start_step must be in [0, {num_steps - 1}] for num_steps={num_steps}, "
            f"got {start_step!r}"
        )
