"""The caller's framework context, carried into every thread that runs the run's code.

torch keeps grad mode, inference mode, the default device (``torch.device(...)``
as a context, ``torch.set_default_device``) and autocast per thread. A step
that runs in another thread than the one that called ``run()`` (a ``def``
step under ``await loop.run()``, an ``async def`` step or a ``def``
evaluator under ``run_sync()``) would silently compute gradients, allocate
on the CPU or lose autocast. So, as ``torch.nn.parallel.parallel_apply``
carries grad mode and autocast into its worker threads:

* :meth:`ThreadContext.capture` reads that state when ``run()`` or
  ``run_sync()`` is called, in the caller's thread, if ``torch`` is already
  imported (never importing it), and takes the loop's ``step_context``;
* :meth:`ThreadContext.entered` is entered, for the whole run, in each thread
  that runs the run's code: the event loop's (``def`` evaluators; the steps
  when they are ``async def``), the step thread (``def`` steps, ``def``
  checkpoint functions) and, under ``run_sync()``, the caller's. There it
  enters what differs from that thread's own state (nothing, in the caller's
  thread), then a fresh ``step_context()``.

The default dtype is process-wide in torch: it is read and compared like the
rest, and so is never changed here. The runner x step-kind table of what runs
where is in docs/guide.md, "Framework state and devices".
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from .._util.log import get_logger

__all__ = ["StepContext", "ThreadContext", "TorchState", "check_step_context"]

_log = get_logger()

#: ``TrainingLoop(step_context=...)``: called with no argument in each thread that
#: runs the run's code; what it returns is entered there for the whole run
StepContext = Callable[[], AbstractContextManager[Any]]

#: the device types whose autocast state is read (those torch does not know are skipped)
_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu", "xla", "mtia", "maia", "privateuseone")


def check_step_context(step_context: object) -> None:
    """``TypeError`` unless ``step_context`` is ``None`` or a zero-argument callable
    (checked when the loop is built; what it returns is checked when it is entered)."""
    if step_context is None:
        return
    fix = (
        "pass a function that makes one, called in each thread that runs the steps: "
        "step_context=lambda: torch.autocast('cuda') (not the context manager itself)"
    )
    if not callable(step_context) and hasattr(step_context, "__enter__"):
        raise TypeError(f"TrainingLoop(step_context=...) got a context manager; {fix}")
    if not callable(step_context):
        raise TypeError(
            f"TrainingLoop(step_context=...) must be a zero-argument callable returning a "
            f"context manager, got {step_context!r}; {fix}"
        )
    try:
        inspect.signature(step_context).bind()
    except TypeError:
        raise TypeError(
            f"TrainingLoop(step_context=...) must take no arguments, got {step_context!r}; {fix}"
        ) from None
    except ValueError:  # no signature to read (a builtin): it is tried when entered
        pass


@dataclass(frozen=True, slots=True)
class TorchState:
    """torch's per-thread state as the caller had it (see the module docstring)."""

    grad: bool
    inference: bool
    dtype: Any
    device: Any
    #: ``(device_type, dtype, cache_enabled)`` for each device type with autocast on
    autocast: tuple[tuple[str, Any, bool], ...]

    @classmethod
    def capture(cls) -> TorchState | None:
        """The calling thread's state, or ``None`` when torch is not imported."""
        torch: Any = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "is_grad_enabled"):  # absent, or half-imported
            return None
        return cls(
            grad=torch.is_grad_enabled(),
            inference=torch.is_inference_mode_enabled(),
            dtype=torch.get_default_dtype(),
            device=torch.get_default_device(),
            autocast=_autocast_of(torch),
        )

    def enter(self, stack: contextlib.ExitStack) -> None:
        """Make this thread's state the captured one, until ``stack`` closes."""
        torch: Any = sys.modules["torch"]
        if torch.is_inference_mode_enabled() != self.inference:
            stack.enter_context(torch.inference_mode(self.inference))
        if torch.is_grad_enabled() != self.grad:
            stack.enter_context(torch.set_grad_enabled(self.grad))
        if torch.get_default_dtype() != self.dtype:  # pragma: no cover - process-wide in torch
            previous = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            stack.callback(torch.set_default_dtype, previous)
        if torch.get_default_device() != self.device:
            stack.enter_context(torch.device(self.device))
        mine = {d: (dt, c) for d, dt, c in _autocast_of(torch)}
        for device_type, dtype, cache in self.autocast:
            if mine.get(device_type) != (dtype, cache):
                stack.enter_context(
                    torch.autocast(device_type, dtype=dtype, enabled=True, cache_enabled=cache)
                )


def _autocast_of(torch: Any) -> tuple[tuple[str, Any, bool], ...]:
    found = []
    for device_type in _AUTOCAST_DEVICES:
        try:
            if torch.is_autocast_enabled(device_type):
                found.append(
                    (
                        device_type,
                        torch.get_autocast_dtype(device_type),
                        torch.is_autocast_cache_enabled(),
                    )
                )
        except (RuntimeError, ValueError, TypeError):  # a device type this torch lacks
            continue
    return tuple(found)


@dataclass(frozen=True, slots=True)
class ThreadContext:
    """What a run carries into the threads that run its code (module docstring)."""

    torch: TorchState | None = None
    step_context: StepContext | None = None

    @classmethod
    def capture(cls, step_context: StepContext | None = None) -> ThreadContext:
        """Read the calling thread's framework state (call it where ``run()`` or
        ``run_sync()`` was called). Cheap; imports nothing."""
        return cls(TorchState.capture(), step_context)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The captured state and a fresh ``step_context()``, in this thread, inside.

        Raises what entering ``step_context()`` raised (with a note naming the
        thread), or ``TypeError`` when it returned no context manager. Leaving
        never raises: a ``step_context`` whose exit raised is logged.
        """
        if self.torch is None and self.step_context is None:
            yield
            return
        stack = contextlib.ExitStack()
        try:
            if self.torch is not None:
                self.torch.enter(stack)
            if self.step_context is not None:
                stack.enter_context(_made(self.step_context))
        except BaseException as exc:
            stack.close()
            exc.add_note(
                f"while entering TrainingLoop(step_context=...) in thread "
                f"{threading.current_thread().name!r}"
            )
            raise
        try:
            yield
        finally:
            try:
                stack.close()
            except Exception as exc:
                _log.warning(
                    "step_context raised when it was left; the run's result stands",
                    thread=threading.current_thread().name,
                    error=f"{type(exc).__name__}: {exc}",
                )


def _made(step_context: StepContext) -> AbstractContextManager[Any]:
    made = step_context()
    if not (hasattr(made, "__enter__") and hasattr(made, "__exit__")):
        raise TypeError(
            f"TrainingLoop(step_context=...) must return a context manager (with "
            f"__enter__ and __exit__), got {made!r}; an async context manager cannot be "
            "entered in a thread"
        )
    return made
