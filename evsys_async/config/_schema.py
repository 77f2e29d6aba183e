"""The config schema: the msgspec Structs a config file is converted to.

What this module promises: a :class:`RunConfig` or :class:`ExperimentConfig`
that exists has the right structure and types (msgspec checked them on
``convert``: unknown fields are errors, names match ``[A-Za-z0-9][A-Za-z0-9_.-]*``,
counts and timeouts are positive). Nothing here imports user code or checks
kinds and params: that is the loader's second pass (``_build.check_config``).

The public classes say they are from ``evsys_async.config`` (their
``__module__``), their public path; so their annotations are real objects, not
strings (msgspec resolves string annotations in the namespace ``__module__``
names).
"""

from typing import Annotated, Any, Literal, TypeAlias

import msgspec

from ..callbacks.registry import CallbackSpec

__all__ = [
    "ARM_FIELDS",
    "AnyConfig",
    "CoordinatorSpec",
    "EvaluatorSpec",
    "ExperimentConfig",
    "RunConfig",
    "TransportSpec",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Name = Annotated[str, msgspec.Meta(pattern=_NAME)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class EvaluatorSpec(msgspec.Struct, forbid_unknown_fields=True):
    """``{kind, params}``: which registered evaluator to build, with what arguments."""

    kind: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class TransportSpec(msgspec.Struct, forbid_unknown_fields=True):
    """``{kind, params}``: a sink that gets every event of the run (kind ``redis``:
    :class:`~evsys_async.transports.RedisStreamSink`'s parameters, plus ``url_env``,
    the name of an environment variable that holds the URL)."""

    kind: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class CoordinatorSpec(TransportSpec):
    """``{kind, params}``: what keeps the ranks of a run in step (kind ``redis``:
    :class:`~evsys_async.transports.RedisCoordinator`'s parameters, plus ``url_env``).
    ``run_key`` defaults to the run's ``name``; rank and world size to the
    launcher's environment."""


class RunConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One run. Files go to ``<output_dir>/<name>/`` (``<name>-1``, ... when that
    holds an earlier run's files, unless ``overwrite``).

    ``step`` is ``"demo"`` (the built-in demo) or ``"package.module:function"``,
    called as ``step(state, step_idx)``; ``params`` plus ``seed`` reach it as
    ``state.ctx.run_config``. ``checkpoint`` (optional) is
    ``"package.module:function"`` called as ``checkpoint(state, name)``.
    ``transports`` send every event of the run elsewhere as well (a Redis
    stream: docs/distributed.md); their URLs are recorded redacted.
    ``coordinator`` keeps several ranks of the run in step (docs/distributed.md).
    ``strict`` fails the run for what is otherwise logged and reported (a
    callback's error, a non-numeric metric, a logger that lost data).
    The other fields are :class:`TrainingLoop`'s arguments of the same name.
    """

    name: Name = "run"
    output_dir: str = "runs"
    num_steps: PositiveInt
    step: str = "demo"
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    seed: int = 0
    evaluators: list[EvaluatorSpec] = msgspec.field(default_factory=list)
    callbacks: list[CallbackSpec] = msgspec.field(default_factory=list)
    transports: list[TransportSpec] = msgspec.field(default_factory=list)
    coordinator: CoordinatorSpec | None = None
    eval_mode: Literal["inline", "background"] = "inline"
    eval_timeout: Seconds = 300.0
    max_evals_in_flight: PositiveInt = 2
    save_every: NonNegativeInt = 0
    checkpoint: str | None = None
    control_timeout: Seconds = 10.0
    drain_timeout: Seconds = 60.0
    callback_errors: Literal["log", "raise"] = "log"
    overwrite: bool = False
    strict: bool = False


#: RunConfig fields an arm may override (the rest are shared by every arm).
ARM_FIELDS = ("step", "params", "evaluators")


class ExperimentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Several runs: every arm ``repeats`` times, over the base ``run``.

    ``arms`` maps an arm name to its overrides of ``step``, ``params``
    (merged key by key into the base's) and ``evaluators``. ``callbacks`` are
    experiment-level (they also get the experiment-scope hooks); the base
    run's callbacks are loop-level. Repeat ``r`` runs with seed ``run.seed + r``.
    """

    name: Name
    run: RunConfig
    arms: dict[Name, dict[str, Any]] = msgspec.field(default_factory=lambda: {"base": {}})
    repeats: PositiveInt = 1
    success_metric: str | None = None
    mode: Literal["max", "min"] = "max"
    max_concurrency: PositiveInt = 1
    callbacks: list[CallbackSpec] = msgspec.field(default_factory=list)


AnyConfig: TypeAlias = RunConfig | ExperimentConfig

for _public in (EvaluatorSpec, TransportSpec, CoordinatorSpec, RunConfig, ExperimentConfig):
    _public.__module__ = "evsys_async.config"
