"""What crosses to a callback's own process (``isolation = "process"``), and what it
runs there.

:class:`RemoteCallback` is pickled once, with the bound methods the bus runs
(``handle``, ``setup``, ``flush``, ``teardown``), so they share it in the
child. It carries the callback itself, or — for a callback built from a
config entry — its ``(kind, params)`` (and its saved state on a resume), so
the child builds it from the registry; and a view of the run's state (step,
number of steps, run key, output dir, config, start step, rank, world size,
evaluator names). In the child it builds a :class:`~._runner.HookRunner` over a
child-side :class:`LoopState` whose ``request_stop``, ``request_checkpoint``,
``request_eval`` and ``publish`` are sent to the parent as tagged requests
(``_requests.py``) through :func:`evsys_async.bus.request_parent`; the
parent's adapter applies them to the run's own state before the batch counts
as done. After ``setup``, each ``flush`` and ``teardown`` it reports the
callback's ``degraded`` and ``disabled_reason`` the same way, when they
changed (``CallbackAdapter.degraded``).

Not shipped: the step's ``batch`` (``wants_batch`` callbacks get ``None``),
``state.model``, ``state.extras``, ``ctx.store``/``ids``/``extras``, and the
parent's copy of the callback is not updated by what the child's does.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pickle
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

from .._util.log import get_logger
from ..bus import in_subscriber_process, request_parent
from ..bus._delivery.spawn import main_importable
from ..events import Envelope, Event
from ..state import Degraded, LogContext, LoopState
from ._hooks import overrides
from ._requests import Checkpoint, Eval, Health, Publish, Stop, encode_request
from ._runner import HookRunner, Hooks
from .base import Callback
from .registry import build_callbacks

__all__ = ["RemoteCallback", "call_remote"]

_log = get_logger()


class RemoteCallback:
    """A callback on its way to, and in, its own process (see the module docstring)."""

    #: the one callback of this process (in a child; ``None`` elsewhere)
    active: ClassVar[RemoteCallback | None] = None

    def __init__(self, runner: HookRunner) -> None:
        cb, state = runner.callback, runner.state
        self.name = runner.name
        self.spec: tuple[str, dict[str, Any], str] | None = None
        self.callback: Callback | None = cb
        self.saved: Any = None
        # a kind its process cannot import (registered in a notebook's __main__) crosses
        # as the object, so the bus refuses it at subscribe, naming the fix
        if cb.built_from is not None and (type(cb).__module__ != "__main__" or main_importable()):
            kind, params = cb.built_from
            self.spec = (kind, dict(params), type(cb).__module__)
            self.callback = None
            if state.start_step > 0 and callable(getattr(cb, "state_dict", None)):
                self.saved = cb.state_dict()  # type: ignore[attr-defined]  # loaded on resume
        self.view = _view(state)
        self.overridden = {h: overrides(cb, h) for h in ("setup", "flush", "teardown")}
        self._state: LoopState | None = None
        self._hooks: Hooks | None = None
        self._health = Health(None, None)  # as the parent last heard it

    def hooks(self) -> Hooks:
        """The bound methods the bus pickles and runs in the child: ``setup`` and
        ``teardown`` always (each ends by reporting the callback's health), ``flush``
        when the callback has one."""
        return Hooks(
            self.handle, self.setup, self.flush if self.overridden["flush"] else None, self.teardown
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_state"] = state["_hooks"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if in_subscriber_process():  # unpickled on the child's event loop: build it there
            self._build()

    def _build(self) -> None:
        RemoteCallback.active = self
        if self.spec is not None:
            kind, params, module = self.spec
            with contextlib.suppress(ImportError):  # a kind its module registers
                importlib.import_module(module)
            [cb] = build_callbacks([{"kind": kind, "params": params}])
            if self.saved is not None:
                cb.load_state_dict(self.saved)  # type: ignore[attr-defined]
            self.callback = cb
        assert self.callback is not None
        self._state = _ChildState(**self.view)
        self._hooks = HookRunner(self.callback, self._state).bind()

    # -- what the child runs ---------------------------------------------------------

    def handle(self, event: Event | Envelope) -> Any:
        assert self._hooks is not None
        assert self._state is not None
        inner = event.event if isinstance(event, Envelope) else event
        step = getattr(inner, "step", None)
        if isinstance(step, int):
            self._state.step = step  # the child's state follows the events
        return self._hooks.handler(event)

    def setup(self) -> Any:
        assert self._hooks is not None
        return self._then_report(self._hooks.on_start)

    def flush(self) -> Any:
        assert self._hooks is not None
        return self._then_report(self._hooks.on_batch_end)

    def teardown(self) -> Any:
        assert self._hooks is not None
        return self._then_report(self._hooks.on_close)

    def _then_report(self, hook: Callable[[], Any] | None) -> Any:
        """Run ``hook`` (if the callback has it), then tell the parent the callback's
        health if it changed: also when the hook raised. An awaitable the hook
        returns is awaited first (the child's loop awaits the wrapper)."""
        if hook is None:
            self._report()
            return None
        try:
            result = hook()
        except BaseException:
            self._report()
            raise
        if inspect.isawaitable(result):
            return self._await_then_report(result)
        self._report()
        return result

    async def _await_then_report(self, result: Awaitable[Any]) -> Any:
        try:
            return await result
        finally:
            self._report()

    def _report(self) -> None:
        """``degraded`` and ``disabled_reason`` to the parent, when they changed."""
        cb = self.callback
        degraded = getattr(cb, "degraded", None)
        reason = getattr(cb, "disabled_reason", None)
        health = Health(
            degraded if isinstance(degraded, Degraded) else None,
            str(reason) if reason else None,
        )
        if health != self._health:
            request_parent(encode_request(health))
            self._health = health


def call_remote(method: str, *args: Any) -> Any:
    """In a callback's process: ``callback.<method>(*args)`` on the callback there
    (``state_dict``/``load_state_dict`` through ``Subscription.call``)."""
    remote = RemoteCallback.active
    if remote is None or remote.callback is None:
        raise RuntimeError("call_remote() runs only in a callback's own process")
    return getattr(remote.callback, method)(*args)


class _ChildState(LoopState):
    """The run's state as a callback in its own process sees it: the requests go to
    the parent; ``stop_requested`` reflects this callback's own request only."""

    def request_stop(self, reason: str | None = None, *, failed: bool = False) -> None:
        if not self.stop_requested:
            request_parent(encode_request(Stop(reason, failed)))
        super().request_stop(reason, failed=failed)

    def request_checkpoint(self, name: str) -> None:
        request_parent(encode_request(Checkpoint(name)))

    def request_eval(self) -> None:
        request_parent(encode_request(Eval()))

    def publish(self, event: Event) -> None:
        request_parent(encode_request(Publish.of(event)))


def _view(state: LoopState) -> dict[str, Any]:
    """The fields of the run's state that cross (plain data)."""
    ctx = state.ctx
    return {
        "num_steps": state.num_steps,
        "output_dir": Path(state.output_dir),
        "step": state.step,
        "rank": state.rank,
        "world_size": state.world_size,
        "eval_names": tuple(state.eval_names),
        "start_step": state.start_step,
        "ctx": LogContext(
            output_dir=ctx.output_dir,
            config=_plain(ctx.config, "ctx.config"),
            run_key=ctx.run_key,
            run_config=_plain(ctx.run_config, "ctx.run_config"),
            group_name=ctx.group_name,
        ),
    }


def _plain(value: dict[str, Any], what: str) -> dict[str, Any]:
    """``value`` if it pickles, else an empty dict (and a note at DEBUG)."""
    try:
        pickle.dumps(value)
    except Exception as exc:
        _log.debug("not shipped to a callback's process", field=what, error=repr(exc))
        return {}
    return value
