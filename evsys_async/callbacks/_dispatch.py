"""``dispatch``: call one hook on a list of callbacks, in order, each call isolated.

The experiment calls its experiment-scope hooks (``on_run_start``,
``on_run_end``, ...) through it, and so may a user's own code. Loop-scope
hooks never go through here: they run as bus subscribers (``_adapter.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .._util.aio import is_async_callable
from .._util.log import get_logger
from .._util.worker import DaemonWorker
from ..errors import describe
from ._hooks import overrides
from .base import Callback

__all__ = ["dispatch"]

_log = get_logger()


def _guarded(method: Callable[..., Any], args: Any, kwargs: Any) -> BaseException | None:
    try:
        method(*args, **kwargs)
    except BaseException as exc:  # handed back as the callback's failure
        return exc
    return None


async def dispatch(callbacks: Sequence[object], hook: str, *args: Any, **kwargs: Any) -> None:
    """Call ``hook`` on each callback in list order, each call isolated.

    ``async def`` hooks are awaited; ``def`` hooks run in a daemon thread (the
    loop stays responsive) and are awaited. A hook that raises is logged at
    WARNING with the callback's class and the hook, and the next callback
    runs: in a ``def`` hook's thread that holds for any ``BaseException``.
    Cancellation, and ``KeyboardInterrupt``/``SystemExit`` from an ``async def``
    hook, propagate. Callbacks without the hook are skipped.
    """
    worker: DaemonWorker | None = None
    try:
        for cb in callbacks:
            method = getattr(cb, hook, None)
            if method is None:
                continue
            if isinstance(cb, Callback) and not overrides(cb, hook):
                continue
            error: BaseException | None = None
            try:
                if is_async_callable(method):
                    await method(*args, **kwargs)
                else:
                    if worker is None:
                        worker = DaemonWorker(f"evsys-dispatch:{hook}")
                    # in its thread anything it raises is its failure, BaseException too
                    error = await worker.call(_guarded, method, args, kwargs)
            except (Exception, GeneratorExit, BaseExceptionGroup) as exc:
                error = exc
            if error is not None:
                _log.warning(
                    "callback failed",
                    callback=type(cb).__name__,
                    hook=hook,
                    error=describe(error),
                    exc_info=error,
                )
    finally:
        if worker is not None:
            worker.close()
