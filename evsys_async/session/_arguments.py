"""A ``Session``'s arguments, checked before it claims a run directory or starts a thread.

Each error names the argument, the problem and the fix. Callbacks come as a
run's do, in any of the forms a config or a script writes them: instances, a
kind's name (``"csv_metrics"``), a ``{kind, params, isolation}`` mapping or a
:class:`~evsys_async.callbacks.registry.CallbackSpec`; the ones that are not
instances are built through the registry, every error placed
(``callbacks[2].params.patiense``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .._util.secrets import redact_config
from ..callbacks.base import Callback
from ..callbacks.registry import build_callbacks
from ..coordinator import Coordinator, launch_env
from ..errors import PlacedConfigError

__all__ = ["callbacks_of", "check_options", "hparams", "ranks_of"]


def callbacks_of(items: Sequence[Any] | None) -> list[Callback]:
    """``callbacks=`` as instances, one per subscription. Raises ``ConfigError`` (placed)
    for a bad spec, ``TypeError`` for a class or an object that is neither, and
    ``ValueError`` for one instance given twice."""
    if items is None:
        return []
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
        raise TypeError(
            f"Session: callbacks must be a list (of callbacks, kind names or specs), got {items!r}"
        )
    built: list[Callback] = []
    for i, item in enumerate(items):
        if isinstance(item, type):
            raise TypeError(
                f"Session: callbacks[{i}] is the class {item.__name__}, not an instance; "
                f"pass {item.__name__}(...)"
            )
        if isinstance(item, Callback):
            built.append(item)
            continue
        spec = {"kind": item} if isinstance(item, str) else item
        try:
            (callback,) = build_callbacks([spec], place=("callbacks",))
        except PlacedConfigError as exc:  # placed in a list of one: place it in ours
            place = ("callbacks", i, *exc.path[2:])
            raise PlacedConfigError(place, exc.detail, kind=exc.kind) from None
        built.append(callback)
    seen: dict[int, int] = {}
    for i, cb in enumerate(built):
        first = seen.setdefault(id(cb), i)
        if first != i:
            raise ValueError(
                f"Session: callbacks[{i}] is the same {type(cb).__name__} instance as "
                f"callbacks[{first}]; one instance subscribes once (build it twice)"
            )
    return built


def check_options(
    *,
    config: object,
    num_steps: object,
    start_step: object,
    callback_errors: str,
    timeouts: Mapping[str, object],
    batch_delay: object,
) -> None:
    """The plain options, each with an error that names it and its range."""
    if config is not None and not isinstance(config, Mapping):
        raise TypeError(f"Session: config must be a mapping of hyperparameters, got {config!r}")
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(
            f"Session: num_steps must be an int >= 0 (0: not known), got {num_steps!r}"
        )
    if not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"Session: start_step must be an int >= 0, got {start_step!r}")
    if callback_errors not in ("log", "raise"):
        raise ValueError(
            f"Session: callback_errors must be 'log' or 'raise', got {callback_errors!r}"
        )
    for name, value in timeouts.items():
        if not _seconds(value) or not value > 0:  # type: ignore[operator]
            raise ValueError(f"Session: {name} must be a number of seconds > 0, got {value!r}")
    if not _seconds(batch_delay) or not batch_delay >= 0:  # type: ignore[operator]
        raise ValueError(
            f"Session: batch_delay must be a number of seconds >= 0, got {batch_delay!r}"
        )


def _seconds(value: object) -> bool:
    """``value`` is a finite number (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def ranks_of(
    rank: int | None, world_size: int | None, coordinator: Coordinator | None
) -> tuple[int, int]:
    """This process's rank and the world size: the coordinator's, else as given, else
    from the launcher's environment (``RANK``/``WORLD_SIZE``, ``SLURM_*``)."""
    if coordinator is not None:
        given = {"rank": rank, "world_size": world_size}
        its = {"rank": coordinator.rank, "world_size": coordinator.world_size}
        for name, value in given.items():
            if value is not None and value != its[name]:
                raise ValueError(
                    f"Session: {name}={value} contradicts the coordinator's {name}={its[name]}; "
                    "give it once (the coordinator's is enough)"
                )
        return coordinator.rank, coordinator.world_size
    env_rank, env_size = launch_env()
    rank = env_rank if rank is None else rank
    world_size = env_size if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"Session: rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
        )
    return rank, world_size


def hparams(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """What ``TrainStarted.config`` and ``hparams.yaml`` carry for the session's
    ``config=``: a plain copy with credentials masked, as for a loop run."""
    plain = redact_config(dict(config) if config is not None else {})
    return plain if isinstance(plain, dict) else {}
