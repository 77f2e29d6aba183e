"""Each built-in callback's ``Config`` (what a config file may say) matches its ``__init__``.

``build_callbacks`` validates ``params`` against ``Config`` and then calls
``cls(**fields)``: a parameter added to one and not the other is either
unreachable from a config file or a crash at build time, and a default that
differs means a config and a script build different callbacks. Checked here:
the same names in the same order, the same defaults, the same required ones,
and every value ``Config`` accepts is one ``__init__`` accepts.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from typing import Any, Literal

import msgspec
import pytest

from evsys_async.callbacks.registry import list_callbacks

BUILTINS = {
    kind: cls
    for kind, cls in list_callbacks().items()
    if cls.__module__.startswith("evsys_async.callbacks.")
}


def test_every_builtin_is_checked() -> None:
    assert set(BUILTINS) == {
        "csv_metrics",
        "debug_logger",
        "early_stopping",
        "evsys_logger",
        "local_logger",
        "mlflow",
        "print_progress",
        "tensorboard_logger",
        "wandb_logger",
    }


def _members(tp: Any) -> list[Any]:
    """The members of a union (``X | None``, ``Optional[X]``), else ``[tp]``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _accepts(declared: Any, value_type: Any) -> bool:
    """Does a parameter annotated ``declared`` accept every value of ``value_type``?"""
    if declared is Any:
        return True
    if typing.get_origin(value_type) is Literal:
        values = typing.get_args(value_type)
        if typing.get_origin(declared) is Literal:
            return set(values) <= set(typing.get_args(declared))
        return all(_accepts(declared, type(v)) for v in values)
    if value_type is type(None):
        return declared is type(None)
    if typing.get_origin(declared) is Literal:
        return False
    d_origin = typing.get_origin(declared) or declared
    v_origin = typing.get_origin(value_type) or value_type
    if d_origin is os.PathLike or d_origin is typing.IO:
        return False  # a config gives plain values: str is checked against str
    if isinstance(d_origin, type) and isinstance(v_origin, type):
        if d_origin is float and v_origin is int:
            return True  # the numeric tower: an int is a float argument
        if not issubclass(v_origin, d_origin):
            return False
        d_args, v_args = typing.get_args(declared), typing.get_args(value_type)
        if d_args and v_args:
            return len(d_args) == len(v_args) and all(
                _compatible(d, v) for d, v in zip(d_args, v_args, strict=True)
            )
        return True
    return declared == value_type


def _compatible(declared: Any, value_type: Any) -> bool:
    """Every member of ``value_type`` is accepted by some member of ``declared``."""
    return all(any(_accepts(d, v) for d in _members(declared)) for v in _members(value_type))


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_config_matches_init(kind: str) -> None:
    cls = BUILTINS[kind]
    config = cls.Config  # type: ignore[attr-defined]
    fields = msgspec.structs.fields(config)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # no self
    where = f"{cls.__name__} ({kind})"

    assert [f.name for f in fields] == [p.name for p in params], (
        f"{where}: Config fields and __init__ parameters differ; a config file can set "
        "exactly what a script can pass"
    )
    init_hints = typing.get_type_hints(cls.__init__)
    for f, p in zip(fields, params, strict=True):
        assert p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY), f"{where}: {p.name}"
        required_in_config = f.required
        required_in_init = p.default is inspect.Parameter.empty
        assert required_in_config == required_in_init, (
            f"{where}: {p.name} is required in one of Config and __init__ only"
        )
        if not required_in_config:
            default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            assert default == p.default and type(default) is type(p.default), (
                f"{where}: {p.name} defaults to {default!r} in Config but {p.default!r} in __init__"
            )
        assert _compatible(init_hints[p.name], f.type), (
            f"{where}: Config.{p.name} is {f.type}, which __init__'s "
            f"{init_hints[p.name]} does not accept"
        )


def test_the_type_check_itself() -> None:
    """The comparison that the test above relies on, on known cases."""
    assert _compatible(str | os.PathLike[str], str)
    assert _compatible(str | os.PathLike[str] | None, str | None)
    assert _compatible(float, int) and not _compatible(int, float)
    assert _compatible(Literal["a", "b", "c"], Literal["a", "b"])
    assert not _compatible(Literal["a"], Literal["a", "b"])
    assert _compatible(typing.IO[str] | Literal["stdout"] | None, Literal["stdout"] | None)
    assert _compatible(list[str] | None, list[str] | None)
    assert not _compatible(list[int], list[str])
    assert not _compatible(str, str | None)  # None in Config must be allowed by __init__
    assert _compatible(str, Literal["x"])
