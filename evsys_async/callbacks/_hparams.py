"""The run's hyperparameters as the dashboard loggers record them.

A run's hyperparameters travel in its ``TrainStarted.config`` (``config=``, a
config file's params and settings, secrets redacted), so a live run, a replay
and a consumer all see them; a run that published none falls back to
``state.ctx.run_config``. TensorBoard's hparams plugin and MLflow's params take
flat ``name -> scalar`` pairs: :func:`flat_hparams` names a nested value by its
path (``optimizer/lr``) and writes a list, or anything else that is not a
scalar, as its JSON text. ``hparams.yaml`` (:func:`hparams_yaml`) keeps the
nesting, as Lightning's does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import yaml

from ..state import LoopState
from ._values import json_ready

__all__ = ["Scalar", "flat_hparams", "hparams_of", "hparams_yaml"]

#: what a flat hyperparameter's value is
Scalar = str | int | float | bool


def hparams_of(config: Mapping[str, Any], state: LoopState) -> dict[str, Any]:
    """``TrainStarted.config`` as plain data, else the run's ``ctx.run_config``."""
    chosen = config if config else state.ctx.run_config
    return dict(json_ready(dict(chosen or {})))


def flat_hparams(config: Mapping[str, Any], sep: str = "/") -> dict[str, Scalar]:
    """Nested mappings flattened to ``a/b`` names; ``None`` left out; a list or any
    other non-scalar as its JSON text (``[64, 32]``)."""
    out: dict[str, Scalar] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}{sep}{key}" if prefix else str(key), inner)
        elif value is None:
            return
        elif isinstance(value, str | bool | int | float):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(json_ready(value), sort_keys=True, default=str)

    walk("", config)
    return out


def hparams_yaml(config: Mapping[str, Any]) -> str:
    """The hyperparameters as YAML, nesting kept, keys in their order."""
    return yaml.safe_dump(json_ready(dict(config)), sort_keys=False, allow_unicode=True)
