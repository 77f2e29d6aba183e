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

The package by concept: ``_schema`` (the msgspec Structs), ``_files``
(YAML/TOML/JSON with the line of every place), ``_imports`` (user code by
dotted path), ``_transports`` (the transport and coordinator sections),
``_build`` (checking everything, building a loop or an experiment) and
``_load`` (file to checked config).
"""

from ._build import build_experiment, build_loop, check_config
from ._files import encode_config
from ._imports import DEMO_STEP, import_object
from ._load import load_callbacks, load_config
from ._schema import CoordinatorSpec, EvaluatorSpec, ExperimentConfig, RunConfig, TransportSpec
from ._transports import build_coordinator, build_transports

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
