"""The ``transports:`` and ``coordinator:`` sections: kinds, ``url_env``, redaction.

What this module promises: a transport or coordinator spec is checked against
its kind's parameters before anything is built (errors name
``transports[i].params.<field>`` or ``coordinator.params.<field>``); a
``url_env`` is read from the environment only when the object is built, so
checking a config needs no credentials and a password never has to be in the
file; checking (``build=False``) builds nothing and reads no environment
variable, but it does import the kind's optional dependency (``redis``), so a
missing extra is an error naming the section and the install command.
:func:`redacted` is how a config is recorded (``ctx.config``): URLs
without their credentials.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

from .._util.params import validate_params
from .._util.secrets import redact_url
from ..callbacks.sink import SinkCallback
from ..coordinator import Coordinator
from ..errors import (
    ConfigPath,
    MissingExtraError,
    PlacedConfigError,
    PlacedMissingExtraError,
    did_you_mean,
    import_extra,
)
from ..transports import EnvelopeSink, RedisCoordinator, RedisStreamSink
from ._schema import CoordinatorSpec, TransportSpec

__all__ = [
    "COORDINATOR_KINDS",
    "TRANSPORT_KINDS",
    "build_coordinator",
    "build_transports",
    "redacted",
]

K = TypeVar("K", bound=type)

#: transport kind -> the sink class (its ``Config`` lists the params)
TRANSPORT_KINDS: dict[str, type[EnvelopeSink]] = {"redis": RedisStreamSink}


def _transport_params(
    spec: TransportSpec, i: int, place: ConfigPath
) -> tuple[type[EnvelopeSink], dict[str, Any]]:
    return _redis_params(spec, (*place, i), TRANSPORT_KINDS, "transport")


def _redis_params(
    spec: TransportSpec, at: ConfigPath, kinds: Mapping[str, K], noun: str
) -> tuple[K, dict[str, Any]]:
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
    try:  # checked with the rest, so `validate` says it, not the run at its start
        import_extra("redis", "redis", f"the Redis {noun} ({kind})")
    except MissingExtraError as exc:
        raise PlacedMissingExtraError(at, str(exc), kind=kind) from None
    if url_env is not None:
        fields["url"] = f"${{{url_env}}}"  # resolved when built (see build_transports)
    return cls, fields


def build_transports(
    specs: list[TransportSpec], *, place: str | ConfigPath = "transports", build: bool = True
) -> list[SinkCallback]:
    """The ``transports:`` section as callbacks that feed each sink (checked only, and
    ``[]`` returned, with ``build=False``). Raises :class:`PlacedConfigError` naming
    ``transports[i].params.<field>``; a ``url_env`` that is not set is an error too."""
    prefix: ConfigPath = (place,) if isinstance(place, str) else tuple(place)
    checked = [_transport_params(spec, i, prefix) for i, spec in enumerate(specs)]
    if not build:
        return []
    out: list[SinkCallback] = []
    for i, (cls, fields) in enumerate(checked):
        _resolve_url(fields, (*prefix, i), specs[i].kind)
        out.append(SinkCallback(cls(**fields)))
    return out


def _resolve_url(fields: dict[str, Any], at: ConfigPath, kind: str) -> None:
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
COORDINATOR_KINDS: dict[str, type[Coordinator]] = {"redis": RedisCoordinator}


def build_coordinator(
    spec: CoordinatorSpec | None, *, run_key: str, build: bool = True
) -> Coordinator | None:
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


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """A config as recorded (``ctx.config``): transport URLs without their credentials.

    Edits ``config`` (a fresh ``msgspec.to_builtins`` copy) in place and returns it.
    """
    for holder in (config, config.get("run") or {}):
        for spec in [*(holder.get("transports") or ()), holder.get("coordinator") or {}]:
            params = spec.get("params") or {}
            if isinstance(params.get("url"), str):
                params["url"] = redact_url(params["url"])
    return config
