"""Loading: a config file (or a callbacks file) to a checked config (or callbacks).

What this module promises: :func:`load_config` and :func:`load_callbacks`
read the file (``_files``), convert it to the schema (``_schema``) and check
everything a run needs (``_build.check_config``, the callback registry), so a
config they return runs; every error is one
:class:`~evsys_async.errors.ConfigError` that starts with the file and the
line (YAML, and malformed TOML/JSON) and names the place inside. Loading
imports the user code the config names and blocks on the file system.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from .._util.params import explain_validation
from ..callbacks.base import Callback
from ..callbacks.registry import build_callbacks
from ..errors import ConfigError, PlacedConfigError, PlacedMissingExtraError, did_you_mean
from ._build import check_config
from ._files import read_source
from ._imports import add_import_dirs
from ._schema import AnyConfig, ExperimentConfig, RunConfig

__all__ = ["load_callbacks", "load_config"]


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
    source = read_source(file)
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
            add_import_dirs(Path.cwd(), file.parent)
            check_config(config)
    except PlacedConfigError as exc:
        raise source.error(exc) from None
    except PlacedMissingExtraError as exc:  # a kind whose extra is not installed here
        raise source.error(PlacedConfigError(exc.place, exc.detail, kind=exc.kind)) from None
    return config


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
    source = read_source(file)
    data = source.parse()
    add_import_dirs(Path.cwd(), file.parent)  # a kind may be a path to a module beside it
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
