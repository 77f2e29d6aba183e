"""Run and experiment configs: typed msgspec Structs, loaded from YAML, TOML or JSON.

A config names everything by kind or by dotted path, so a file describes a run
completely::

    name: demo                  # the run's key: files go to <output_dir>/<name>/
    num_steps: 200
    step: demo                  # or "package.module:function"
    params: {lr: 0.5}           # the step's hyperparameters: state.ctx.run_config
    evaluators: [{kind: demo_accuracy, params: {run_every: 20}}]
    callbacks:  [{kind: print_progress, params: {every: 20}}]
    transports: [{kind: redis, params: {url_env: REDIS_URL}}]   # the events to Redis too

A file with ``arms`` (or ``run``) is an :class:`ExperimentConfig`.

:func:`load_config` checks everything a run needs before anything runs: the
structure and types, every callback's and evaluator's params (each is built
once and dropped) and the dotted-path imports. Every error is a
:class:`~evsys_async.errors.ConfigError` that starts with the place::

    run.yaml:14: callbacks[1].params.patiense (early_stopping): unknown field 'patiense'
    — did you mean 'patience'?

YAML is read with ``yaml.SafeLoader`` only (no Python objects). User code is
imported only through the keys that hold a dotted path (``step``,
``checkpoint``); the config file's directory and the working directory are
put on ``sys.path`` first, so a module beside the config imports.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from .._util.params import explain_validation, validate_params
from .._util.secrets import redact_url
from ..callbacks.base import Callback
from ..callbacks.registry import CallbackSpec, build_callbacks
from ..callbacks.sink import SinkCallback
from ..errors import (
    ConfigError,
    PlacedConfigError,
    PlacedMissingExtraError,
    describe,
    did_you_mean,
    format_path,
)
from ..evaluators import build_evaluators
from ..experiment import Arm, Experiment
from ..loop import TrainingLoop
from ..state import LogContext
from ..transports import RedisCoordinator, RedisStreamSink

__all__ = [
    "CoordinatorSpec",
    "DEMO_STEP",
    "EvaluatorSpec",
    "ExperimentConfig",
    "RunConfig",
    "TransportSpec",
    "build_coordinator",
    "build_experiment",
    "build_loop",
    "build_transports",
    "check_config",
    "encode_config",
    "import_object",
    "load_callbacks",
    "load_config",
]

#: What ``step: demo`` stands for.
DEMO_STEP = "evsys_async.demo:train_step"

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Name = Annotated[str, msgspec.Meta(pattern=_NAME)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]
Path_ = tuple[str | int, ...]


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


AnyConfig = RunConfig | ExperimentConfig


# -- importing user code ---------------------------------------------------------------


def import_object(target: str, *, key: str = "step") -> Any:
    """Import ``"package.module:attr"`` (``attr`` may be dotted); ``"demo"`` is the demo.

    Raises :class:`PlacedConfigError` at ``key`` saying which module or
    attribute could not be imported and why.
    """
    path: Path_ = (key,)
    if target == "demo":
        target = DEMO_STEP
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise PlacedConfigError(
            path,
            f'expected "package.module:function" (or "demo"), got {target!r}'
            + (
                f' — did you mean "{target.rpartition(".")[0]}:{target.rpartition(".")[2]}"?'
                if "." in target and not sep
                else ""
            ),
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise PlacedConfigError(
            path,
            f"could not import module {module_name!r} for {target!r}: no module named "
            f"{missing!r} (is it installed, or beside the config file?)",
        ) from None
    except Exception as exc:
        raise PlacedConfigError(
            path,
            f"importing module {module_name!r} for {target!r} raised {describe(exc)}",
        ) from exc
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            where = ".".join([module_name, *attr.split(".")[:i]])
            names = [n for n in dir(obj) if not n.startswith("_")]
            hint = did_you_mean(part, names)
            raise PlacedConfigError(
                path, f"could not import {target!r}: {where!r} has no attribute {part!r}{hint}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise PlacedConfigError(path, f"{target!r} is {type(obj).__name__}, not a callable")
    return obj


def _add_import_dirs(*dirs: Path) -> None:
    for d in dirs:
        text = str(d.resolve())
        if text not in sys.path:
            sys.path.insert(0, text)


# -- transports ------------------------------------------------------------------------

#: transport kind -> the sink class (its ``Config`` lists the params)
TRANSPORT_KINDS: dict[str, type] = {"redis": RedisStreamSink}


def _transport_params(spec: Any, i: int, place: Path_) -> tuple[type, dict[str, Any]]:
    return _redis_params(spec, (*place, i), TRANSPORT_KINDS, "transport")


def _redis_params(
    spec: Any, at: Path_, kinds: dict[str, type], noun: str
) -> tuple[type, dict[str, Any]]:
    """A ``{kind, params}`` spec checked against ``kinds``, with ``url_env`` kept as a
    placeholder until built (see :func:`_resolve_url`)."""
    kind = spec.kind
    cls = kinds.get(kind)
    if cls is None:
        known = sorted(kinds)
        raise PlacedConfigError(
            (*at, "kind"),
            f"unknown {noun} kind {kind!r}"
            + did_you_mean(kind, known, f"; known kinds: {', '.join(known)}"),
        )
    params = dict(spec.params)
    url_env = params.pop("url_env", None)
    if url_env is not None and not isinstance(url_env, str):
        raise PlacedConfigError(
            (*at, "params", "url_env"),
            f"expected the name of an environment variable, got {type(url_env).__name__}",
            kind=kind,
        )
    if url_env is not None and "url" in params:
        raise PlacedConfigError(
            (*at, "params", "url_env"),
            "give url or url_env, not both (url_env keeps a password out of the file)",
            kind=kind,
        )
    fields = validate_params(cls, params, at, kind=kind)
    if url_env is not None:
        fields["url"] = f"${{{url_env}}}"  # resolved when built (see build_transports)
    return cls, fields


def build_transports(
    specs: list[TransportSpec], *, place: str | Path_ = "transports", build: bool = True
) -> list[SinkCallback]:
    """The ``transports:`` section as callbacks that feed each sink (checked only, and
    ``[]`` returned, with ``build=False``). Raises :class:`PlacedConfigError` naming
    ``transports[i].params.<field>``; a ``url_env`` that is not set is an error too."""
    prefix: Path_ = (place,) if isinstance(place, str) else tuple(place)
    checked = [_transport_params(spec, i, prefix) for i, spec in enumerate(specs)]
    if not build:
        return []
    out: list[SinkCallback] = []
    for i, (cls, fields) in enumerate(checked):
        _resolve_url(fields, (*prefix, i), specs[i].kind)
        out.append(SinkCallback(cls(**fields)))
    return out


def _resolve_url(fields: dict[str, Any], at: Path_, kind: str) -> None:
    """Replace a ``url_env`` placeholder by the variable's value, or say it is unset."""
    url = fields.get("url", "")
    if isinstance(url, str) and url.startswith("${") and url.endswith("}"):
        name = url[2:-1]
        value = os.environ.get(name)
        if not value:
            raise PlacedConfigError(
                (*at, "params", "url_env"),
                f"the environment variable {name} is not set; set it to the Redis URL "
                "(redis://:password@host:6379/0)",
                kind=kind,
            )
        fields["url"] = value


#: coordinator kind -> the class (its ``__init__`` lists the params)
COORDINATOR_KINDS: dict[str, type] = {"redis": RedisCoordinator}


def build_coordinator(spec: CoordinatorSpec | None, *, run_key: str, build: bool = True) -> Any:
    """The ``coordinator:`` section as a coordinator (``None`` without one; checked
    only with ``build=False``). Raises :class:`PlacedConfigError` naming
    ``coordinator.params.<field>``."""
    if spec is None:
        return None
    cls, fields = _redis_params(spec, ("coordinator",), COORDINATOR_KINDS, "coordinator")
    if not build:
        return None
    _resolve_url(fields, ("coordinator",), spec.kind)
    fields.setdefault("run_key", run_key)
    return cls(**fields)


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    """A config as recorded (``ctx.config``): transport URLs without their credentials."""
    for holder in (config, config.get("run") or {}):
        for spec in [*(holder.get("transports") or ()), holder.get("coordinator") or {}]:
            params = spec.get("params") or {}
            if isinstance(params.get("url"), str):
                params["url"] = redact_url(params["url"])
    return config


# -- checking and building -------------------------------------------------------------


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


def _prefixed(prefix: Path_, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except PlacedConfigError as exc:
        raise PlacedConfigError((*prefix, *exc.path), exc.detail, kind=exc.kind) from exc
    except PlacedMissingExtraError as exc:
        raise PlacedMissingExtraError((*prefix, *exc.place), exc.detail, kind=exc.kind) from None


def _check_run(config: RunConfig, prefix: Path_) -> None:
    _prefixed(prefix, lambda: import_object(config.step, key="step"))
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
        config=_redacted(msgspec.to_builtins(config)),
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

    def loop_callbacks() -> list[Any]:
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
            config=_redacted(msgspec.to_builtins(config)),
        ),
        loop_options=options,
        overwrite=run.overwrite,
    )


# -- files -----------------------------------------------------------------------------

_FORMATS = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}


def _format_of(path: Path) -> str:
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(
            f"{path}: unknown config format {path.suffix or '(no suffix)'!r}; "
            "use .yaml/.yml, .toml or .json"
        )
    return fmt


class _Source:
    """A config file's text and, for YAML, its node tree (to map paths to lines)."""

    def __init__(self, path: Path, text: str, fmt: str) -> None:
        self.path = path
        self.text = text
        self.fmt = fmt
        self.root: yaml.Node | None = None
        #: a leading part of every error's path that the file itself does not spell
        #: (a callbacks file that is a bare list: its errors say ``callbacks[1]...``)
        self.implicit: Path_ = ()

    def parse(self) -> Any:
        if self.fmt == "yaml":
            loader = _YamlLoader(self.text)
            try:
                self.root = loader.get_single_node()
                _check_yaml_tree(self.root, self)
                return loader.construct_document(self.root) if self.root is not None else None
            except yaml.MarkedYAMLError as exc:
                mark = exc.problem_mark or exc.context_mark
                line = f":{mark.line + 1}" if mark is not None else ""
                problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
                raise ConfigError(f"{self.path}{line}: malformed YAML: {problem}") from None
            except yaml.reader.ReaderError as exc:  # a character YAML does not allow
                at = self.text.count("\n", 0, exc.position) + 1
                raise ConfigError(
                    f"{self.path}:{at}: malformed YAML: character {exc.character!r} "
                    "is not allowed in a YAML file"
                ) from None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{self.path}: malformed YAML: {exc}") from None
            except RecursionError:
                raise ConfigError(
                    f"{self.path}: malformed YAML: nested too deeply to be a config"
                ) from None
            finally:
                loader.dispose()
        if self.fmt == "toml":
            try:
                return tomllib.loads(self.text)
            except tomllib.TOMLDecodeError as exc:
                m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
                line = f":{m.group(1)}" if m else ""
                raise ConfigError(f"{self.path}{line}: malformed TOML: {exc}") from None
        try:
            return json.loads(self.text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{self.path}:{exc.lineno}: malformed JSON: {exc.msg}") from None

    def line_of(self, path: Path_) -> int | None:
        """The 1-based line of the deepest node ``path`` reaches (YAML only)."""
        node = self.root
        if node is None:
            return None
        if self.implicit and path[: len(self.implicit)] == self.implicit:
            path = path[len(self.implicit) :]
        line = node.start_mark.line + 1
        for part in path:
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if key.value == str(part):
                        line = key.start_mark.line + 1
                        node = value
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if part >= len(node.value):
                    return line
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    def error(self, exc: PlacedConfigError) -> ConfigError:
        line = self.line_of(exc.path)
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        return ConfigError(f"{where}: {exc}")


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e308`` and ``1E-5`` as floats.

    YAML 1.1 (PyYAML's default) wants a dot in a float, so ``drain_timeout: 1e308``
    would be the string ``"1e308"``; YAML 1.2 and every other format read it as a
    number, and so does this loader.
    """


class _YamlDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes the strings :class:`_YamlLoader` would read as
    floats (``"0E0"``), so :func:`encode_config` round-trips them."""


for _cls in (_YamlLoader, _YamlDumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )

#: How many values a YAML file may expand to once its aliases are followed. Anchors
#: and aliases keep working (a shared block of params is a few hundred values);
#: a "billion laughs" file, a few lines that expand to millions, stops here.
YAML_EXPANSION_BUDGET = 100_000


def _check_yaml_tree(root: yaml.Node | None, source: _Source) -> None:
    """Duplicate keys, recursive aliases and the expansion budget, each node once.

    An aliased node is one object shared by every reference, so it is checked
    once and its expanded size is remembered, however many times it is used.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, path: Path_) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(
                f"{source.path}:{node.start_mark.line + 1}: {_place(path)}: an alias refers "
                "to the block that contains it, which would never end; write the value out"
            )
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, v in node.value:
                line = k.start_mark.line + 1
                if k.value in seen:
                    raise ConfigError(
                        f"{source.path}:{line}: duplicate key {k.value!r} "
                        f"(first on line {seen[k.value]}); YAML keeps only the last"
                    )
                seen[k.value] = line
                total += size(v, (*path, str(k.value)))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                total += size(item, (*path, i))
        active.discard(key)
        if total > YAML_EXPANSION_BUDGET:
            raise ConfigError(
                f"{source.path}:{node.start_mark.line + 1}: {_place(path)}: its aliases expand "
                f"to more than {YAML_EXPANSION_BUDGET:,} values, far more than a config holds "
                "(an alias bomb?); write the values out or use fewer nested aliases"
            )
        sizes[key] = total
        return total

    if root is not None:
        size(root, ())


def _place(path: Path_) -> str:
    return format_path(path) or "the top level"


def _text_of(file: Path, data: bytes) -> str:
    """The file's text; a binary file or a NUL byte is one line naming the place."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{file}:{line}: byte 0x{data[exc.start]:02x} at column {column} is not UTF-8 "
            "text: is this a binary file? A config is YAML, TOML or JSON text"
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        column = nul - (text.rfind("\n", 0, nul) + 1) + 1
        raise ConfigError(
            f"{file}:{line}: a NUL byte at column {column}: a config is text, and NUL is "
            "not allowed in YAML, TOML or JSON (was the file saved by a binary tool?)"
        )
    return text.removeprefix("\ufeff")  # a BOM some editors write


def load_config(path: str | os.PathLike[str], *, check: bool = True) -> AnyConfig:
    """Load a :class:`RunConfig` or :class:`ExperimentConfig` from YAML, TOML or JSON.

    The format follows the suffix. With ``check`` (default) it also runs
    :func:`check_config`: the dotted-path imports, and every callback and
    evaluator built once. Raises :class:`ConfigError` naming the file, the
    line (YAML, and malformed TOML/JSON) and the path inside, e.g.
    ``run.yaml:14: callbacks[1].params.patiense (early_stopping): unknown
    field 'patiense' — did you mean 'patience'?``.
    """
    file = Path(path)
    source = _read_source(file)
    data = source.parse()
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{file}: a config is a mapping of settings (name, num_steps, step, ...), "
            f"got {type(data).__name__}"
        )
    kind: type[RunConfig] | type[ExperimentConfig] = (
        ExperimentConfig if ("arms" in data or "run" in data) else RunConfig
    )
    try:
        try:
            config: AnyConfig = msgspec.convert(data, kind)
        except msgspec.ValidationError as exc:
            raise explain_validation(str(exc), kind, data) from None
        if check:
            _add_import_dirs(Path.cwd(), file.parent)
            check_config(config)
    except PlacedConfigError as exc:
        raise source.error(exc) from None
    except PlacedMissingExtraError as exc:  # a kind whose extra is not installed here
        raise source.error(PlacedConfigError(exc.place, exc.detail, kind=exc.kind)) from None
    return config


def _read_source(file: Path) -> _Source:
    fmt = _format_of(file)
    try:
        data_bytes = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the config: {exc.strerror or exc}") from None
    return _Source(file, _text_of(file, data_bytes), fmt)


def load_callbacks(path: str | os.PathLike[str]) -> list[Callback]:
    """Build the callbacks a file lists (``evsys-async replay --callbacks FILE``).

    The file is YAML, TOML or JSON: a list of ``{kind, params}``, or a mapping
    whose one key ``callbacks`` holds that list (TOML has no top-level list:
    ``[[callbacks]]``). Checked as a run config's ``callbacks:`` is; raises
    :class:`ConfigError` naming the file, the line (YAML) and the place, e.g.
    ``cbs.yaml:3: callbacks[1].params.out_pat (csv_metrics): unknown field
    'out_pat' — did you mean 'out_path'?``.
    """
    file = Path(path)
    source = _read_source(file)
    data = source.parse()
    try:
        if isinstance(data, Mapping):
            for key in data:
                if key != "callbacks":
                    hint = did_you_mean(str(key), ["callbacks"], ";")
                    raise PlacedConfigError(
                        (str(key),),
                        f"unknown key {key!r}{hint} a callbacks file is a list of "
                        "{kind, params}, or holds that list under 'callbacks'",
                    )
            specs = data.get("callbacks", [])
        elif isinstance(data, list):
            specs = data
            source.implicit = ("callbacks",)
        else:
            raise ConfigError(
                f"{file}: a callbacks file is a list of {{kind, params}} (or a mapping with "
                f"the key 'callbacks'), got {type(data).__name__}"
            )
        return build_callbacks(specs, place="callbacks")
    except PlacedConfigError as exc:
        raise source.error(exc) from None
    except PlacedMissingExtraError as exc:  # a kind whose extra is not installed here
        raise source.error(PlacedConfigError(exc.place, exc.detail, kind=exc.kind)) from None


def encode_config(config: AnyConfig, fmt: Literal["yaml", "json"] = "yaml") -> str:
    """``config`` as YAML or JSON text that :func:`load_config` reads back equal."""
    data = msgspec.to_builtins(config)
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    text: str = yaml.dump(data, Dumper=_YamlDumper, sort_keys=False, allow_unicode=True)
    return text
