"""The exception tree of evsys-async.

Every error the library raises on purpose derives from :class:`EvsysError`
and also from the builtin it behaves like, so ``except ValueError`` keeps
working for code that does not know this library::

    EvsysError
    ├── ConfigError(ValueError)        a config, a spec or a callback's params is wrong
    │   └── PlacedConfigError          ... and it knows where: ("callbacks", 1, "params", "x")
    ├── EventDecodeError(ValueError)   an encoded event or event log is malformed
    ├── MissingExtraError(ImportError) an optional dependency is not installed
    │   └── PlacedMissingExtraError    ... for a config's spec, which it names
    ├── BusClosedError(RuntimeError)   the bus is not open (subscribe before enter/after exit)
    └── CallbackProcessError(RuntimeError)  a callback's own process died, was killed,
                                       could not start, or raised what cannot cross back

``ChildTraceback`` is not raised: it is the ``__cause__`` of an exception that
a callback raised in its own process, and carries that process's traceback text.

Messages name the place (file, line, ``callbacks[1].params.patiense``), the
problem and, where one exists, the fix.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import TypeAlias

__all__ = [
    "BusClosedError",
    "CallbackProcessError",
    "ChildTraceback",
    "ConfigError",
    "ConfigPath",
    "PlacedConfigError",
    "PlacedMissingExtraError",
    "format_path",
    "describe",
    "did_you_mean",
    "EventDecodeError",
    "EvsysError",
    "MissingExtraError",
    "import_extra",
    "missing_extra",
]


#: A place inside a config: ``("callbacks", 1, "params", "patiense")``.
ConfigPath: TypeAlias = tuple[str | int, ...]


class EvsysError(Exception):
    """Base of every error raised on purpose by evsys-async."""


class ConfigError(EvsysError, ValueError):
    """A config file, a callback spec or its params are invalid.

    The message starts with the place (``run.yaml:12: callbacks[1].params``)
    and ends with the fix or the likely name.
    """


class EventDecodeError(EvsysError, ValueError):
    """An encoded event, envelope or event-log line could not be decoded."""


class MissingExtraError(EvsysError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""


class BusClosedError(EvsysError, RuntimeError):
    """The operation needs an open bus (inside ``async with EventBus()``)."""


class CallbackProcessError(EvsysError, RuntimeError):
    """A subscriber's own process (``isolation="process"``) died, was killed, could not
    start, or raised an exception that could not be rebuilt in this process (the
    message then starts with the original type)."""


class ChildTraceback(Exception):
    """The traceback text of an exception raised in a callback's own process.

    Set as the ``__cause__`` of the exception rebuilt in the parent, so a log
    handler that prints ``exc_info`` shows where the child raised.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class PlacedConfigError(ConfigError):
    """A :class:`ConfigError` that knows where it happened.

    ``path`` is the place inside the config (``("callbacks", 1, "params",
    "patiense")``), ``detail`` the problem and fix without the place; the
    message is ``"<path> (<kind>): <detail>"``.
    """

    def __init__(self, path: ConfigPath, detail: str, *, kind: str | None = None) -> None:
        self.path = path
        self.detail = detail
        self.kind = kind
        where = format_path(path)
        label = f" ({kind})" if kind else ""
        super().__init__(f"{where}{label}: {detail}" if where else f"{detail}")


class PlacedMissingExtraError(MissingExtraError):
    """A :class:`MissingExtraError` raised while building a spec, with the spec's place.

    The message is the extra's own (it names the install command); ``place``
    and ``kind`` let a config loader put the file, line and place in front of it.
    """

    def __init__(self, place: ConfigPath, detail: str, *, kind: str | None = None) -> None:
        self.place = place
        self.detail = detail
        self.kind = kind
        super().__init__(detail)


def format_path(path: Sequence[str | int]) -> str:
    """``("callbacks", 1, "params", "x")`` -> ``"callbacks[1].params.x"``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def missing_extra(module: str, extra: str, what: str) -> MissingExtraError:
    """Build the error for a missing optional dependency.

    ``what`` is the feature that needs it, e.g. ``"tensorboard_logger"``.
    """
    return MissingExtraError(
        f"{what} needs the optional dependency {module!r}, which is not installed; "
        f"install it with: pip install 'evsys-async[{extra}]'"
    )


def import_extra(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional dependency, or raise :func:`missing_extra`'s error.

    Called when the feature is built (a callback's ``__init__``, a transport's
    constructor), never at ``import evsys_async``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_extra(module, extra, what) from exc


def did_you_mean(name: str, options: Iterable[str], otherwise: str = "") -> str:
    """`` — did you mean 'x'?`` for the closest of ``options``, else ``otherwise``."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" — did you mean {close[0]!r}?" if close else otherwise


def describe(exc: BaseException, *, timeout: float | None = None) -> str:
    """The one-line form events and reports carry: ``"ValueError: nan loss"``, or
    ``"timeout after 5.0s"`` for a ``TimeoutError`` when ``timeout`` is given."""
    if timeout is not None and isinstance(exc, TimeoutError):
        return f"timeout after {timeout}s"
    return f"{type(exc).__name__}: {exc}"
