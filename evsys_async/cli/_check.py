"""``evsys-async validate``, ``callbacks`` and ``evaluators``: commands that look, never run.

What this module promises: ``validate`` runs every check a run would
(structure, types, imports, kinds, params) and starts nothing; the lists show
every registered kind with its params as a config spells them. Each writes to
``out`` and returns the exit code.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import msgspec

from ..config import ExperimentConfig, load_config
from ._stdio import EXIT_OK

__all__ = ["cmd_list", "cmd_validate"]


def cmd_validate(args: argparse.Namespace, out: TextIO) -> int:
    """``evsys-async validate CONFIG``: load and check it completely, say what it runs;
    a bad config raises :class:`~evsys_async.errors.ConfigError` (exit 2)."""
    config = load_config(args.config)
    if isinstance(config, ExperimentConfig):
        print(
            f"ok: {args.config}: experiment {config.name!r}, arms {', '.join(config.arms)}, "
            f"{config.repeats} repeat(s), {config.run.num_steps} steps each",
            file=out,
        )
    else:
        print(
            f"ok: {args.config}: run {config.name!r}, {config.num_steps} steps of "
            f"{config.step!r}, {len(config.evaluators)} evaluator(s), "
            f"{len(config.callbacks)} callback(s); files go to "
            f"{Path(config.output_dir) / config.name}/ (or {config.name}-1, ... if it holds "
            "an earlier run's files)",
            file=out,
        )
    return EXIT_OK


def cmd_list(kinds: Mapping[str, type], what: str, out: TextIO) -> int:
    """``evsys-async callbacks`` / ``evaluators``: each kind, its class, the first
    paragraph of its docstring and its params (name, type, default)."""
    print(f"{len(kinds)} {what} kind(s):", file=out)
    for name, cls in kinds.items():
        doc = " ".join((inspect.getdoc(cls) or "").split("\n\n", 1)[0].split())
        print(f"\n{name}  ({cls.__module__}.{cls.__qualname__})", file=out)
        if doc:
            print(f"  {doc}", file=out)
        fields = _fields(cls)
        if not fields:
            print("  (no params)", file=out)
        for field, type_, default in fields:
            print(f"  {field}: {type_}{default}", file=out)
    return EXIT_OK


def _fields(cls: type) -> list[tuple[str, str, str]]:
    config = getattr(cls, "Config", None)
    rows: list[tuple[str, str, str]] = []
    if config is not None:
        for f in msgspec.structs.fields(config):
            if f.default is not msgspec.NODEFAULT:
                default = f" = {f.default!r}"
            elif f.default_factory is not msgspec.NODEFAULT:
                default = f" = {f.default_factory()!r}"
            else:
                default = "  (required)"
            rows.append((f.name, _type_name(f.type), default))
        return rows
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:  # type: ignore[misc]
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        type_ = p.annotation if p.annotation is not p.empty else "Any"
        default = f" = {p.default!r}" if p.default is not p.empty else "  (required)"
        rows.append((p.name, _type_name(type_), default))
    return rows


def _type_name(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type) and not getattr(tp, "__args__", None):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("NoneType", "None")
