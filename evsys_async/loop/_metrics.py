"""A step's or an evaluator's metrics as the plain floats every subscriber gets.

:class:`MetricReader` reads one source's metrics (the steps, or one
evaluator), once per step, on the thread that produced them:

* a float, an int, a bool, a numpy scalar or a CPU tensor becomes a float
  here, inline (a CPU tensor's ``float()`` waits for nothing);
* a value on a device (``value.device.type`` is not ``"cpu"``: a CUDA, MPS or
  XLA tensor, or anything shaped so) is *not* converted here, because
  ``float()`` would wait for the device to finish every kernel queued before
  it. It is copied on its device instead (``detach().clone()``; a torch CUDA
  tensor: a non-blocking copy to pinned host memory and a CUDA event), which
  does not block, and the metrics come back as :class:`Pending`. One
  converter (``_convert.py``) turns them into floats off the training thread,
  in step order, before their ``StepEnded`` is published. The copy is why a
  step may go on to change its tensor in place without changing what is logged;
* a sequence or a mapping of numbers is flattened: ``{"acc": [0.5, 0.7]}``
  becomes ``acc/0`` and ``acc/1``, ``{"loss": {"a": {"b": 1}}}`` becomes
  ``loss/a/b``;
* anything else (a string, ``None``, an object, a tensor of several values)
  is skipped, with one WARNING per key for the run (naming the key and the
  type), not one per step. Under ``strict`` it is an error instead: the
  step fails, as an evaluator's result does.

Events carry exactly what the loggers write: the flattened floats, without
the skipped keys (docs/design.md, "A run").
"""

from __future__ import annotations

import reprlib
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .._util.log import get_logger
from ..events._frozen import FrozenDict
from ..state import StepOutput

__all__ = ["MetricReader", "Pending", "resolve"]

_log = get_logger()
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
#: not numbers, though ``float()`` takes some of them (``float("0.5")``)
_TEXT = (str, bytes, bytearray)


class _Never:
    """Stands for ``torch.Tensor`` where torch is not imported: no value is of it."""


class _OnDevice:
    """A metric value's copy, made on its device without waiting for it; ``value()``
    (in the converter's thread) waits for the copy and returns the float."""

    __slots__ = ("copy", "ready")

    def __init__(self, value: Any) -> None:
        torch = sys.modules.get("torch")
        if torch is not None and value.device.type == "cuda" and isinstance(value, torch.Tensor):
            # queued on the step's stream behind the kernels that make the value; the
            # event marks its end, so the converter needs the GPU for nothing else
            self.copy = value.detach().to("cpu", non_blocking=True)
            self.ready: Any = torch.cuda.Event()
            self.ready.record()
        else:
            self.copy = value.detach().clone()
            self.ready = None

    def value(self) -> float:
        if self.ready is not None:
            self.ready.synchronize()
        return float(self.copy)


class Pending:
    """One step's metrics while some of their values are still on a device: what the
    converter turns into floats (:func:`resolve`). Made by :class:`MetricReader`."""

    __slots__ = ("reader", "values")

    def __init__(self, values: dict[str, Any], reader: MetricReader) -> None:
        #: in the order the step returned them; the device values are ``_OnDevice``
        self.values = values
        self.reader = reader


def resolve(metrics: dict[str, float] | Pending) -> dict[str, float]:
    """``metrics`` as read-only floats: a :class:`Pending`'s device values waited for
    and converted here (the converter's thread), in their order. A value that cannot
    be converted is left out (logged once per key; under ``strict`` kept as the
    reader's :attr:`~MetricReader.failed`). Never raises for a value."""
    if not isinstance(metrics, Pending):
        return metrics
    out: dict[str, float] = {}
    for key, value in metrics.values.items():
        if value.__class__ is _OnDevice:
            try:
                out[key] = value.value()
            except Exception as exc:  # a device error: the key is skipped, as a non-number
                metrics.reader.conversion_failed(key, exc)
        else:
            out[key] = value
    return FrozenDict(out)


class MetricReader:
    """Reads one source's metrics (the steps, or one evaluator) for one run; see the
    module docstring. Not thread-safe: one thread reads (the step's, or the loop)."""

    def __init__(self, source: str, *, strict: bool) -> None:
        #: ``"step"`` or ``"evaluator 'val'"``: what errors and warnings name
        self.source = source
        self.strict = strict
        #: under ``strict``: a device value that failed to convert after its step
        #: returned; the next step with device values fails with it
        self.failed: BaseException | None = None
        self._warned: set[str] = set()
        self._lock = threading.Lock()  # _warned is also written by the converter
        torch = sys.modules.get("torch")  # never imported here
        #: ``torch.Tensor`` when torch was imported before this reader was made: a CPU
        #: tensor of it takes the short path in :meth:`read`
        self._tensor: type = torch.Tensor if torch is not None else _Never

    def step_output(self, out: Any, step_idx: int) -> tuple[dict[str, float] | Pending, Any]:
        """A step's return value as ``(metrics, batch)``; raises ``TypeError`` for one
        that is no mapping, or (``strict``) holds a non-number."""
        if isinstance(out, StepOutput):
            return self.read(out.metrics, step_idx), out.batch
        if out is None:
            return FrozenDict(), None
        return self.read(out, step_idx), None

    def read(self, values: Any, step_idx: int) -> dict[str, float] | Pending:
        """``values`` as read-only floats, ready to go into an event without another
        copy; a :class:`Pending` when some are on a device. Raises ``TypeError`` for
        a non-mapping, and under ``strict`` for a non-number."""
        if not isinstance(values, Mapping):
            raise TypeError(
                f"{self._where(step_idx)} must return a mapping of metric name to number, "
                f"got {_repr.repr(values)}"
            )
        out: dict[str, Any] = {}
        on_device = False
        for key, value in values.items():
            cls = value.__class__
            if cls is float:  # the common case, first and cheapest
                out[key if key.__class__ is str else str(key)] = value
            elif cls is int:
                out[key if key.__class__ is str else str(key)] = float(value)
            elif cls is self._tensor and value.is_cpu:  # a trainer's logged loss
                if value.requires_grad:  # a loss as the step computed it: no grad to log
                    value = value.detach()
                try:  # float() of a CPU tensor waits for nothing
                    out[key if key.__class__ is str else str(key)] = float(value)
                except ValueError:  # several elements
                    self._not_a_number(str(key), value, step_idx)
            else:
                on_device |= self._leaf(out, str(key), value, step_idx)
        if not on_device:
            return FrozenDict(out)
        if self.failed is not None:
            raise self.failed
        return Pending(out, self)

    def _leaf(self, out: dict[str, Any], key: str, value: Any, step_idx: int) -> bool:
        """Put ``value`` under ``key`` (flattened, copied on its device, or skipped);
        whether a device value was among it."""
        device = getattr(value, "device", None)
        if device is not None and getattr(device, "type", "cpu") != "cpu":
            numel = getattr(value, "numel", None)
            if callable(numel) and numel() != 1:  # a shape: no wait for the device
                self._not_a_number(key, value, step_idx)
                return False
            out[key] = _OnDevice(value)
            return True
        if isinstance(value, _TEXT):
            self._not_a_number(key, value, step_idx)
            return False
        if isinstance(value, Mapping | Sequence):
            items = value.items() if isinstance(value, Mapping) else enumerate(value)
            on_device = False
            for sub, item in items:
                on_device |= self._leaf(out, f"{key}/{sub}", item, step_idx)
            return on_device
        try:
            out[key] = float(value)
        except (TypeError, ValueError, OverflowError):
            self._not_a_number(key, value, step_idx)
        return False

    def _not_a_number(self, key: str, value: Any, step_idx: int) -> None:
        if self.strict:
            raise TypeError(
                f"{self._where(step_idx)} returned metric {key!r} = {_repr.repr(value)}, "
                f"which is not a number ({type(value).__name__}); return floats, 0-d "
                "tensors, or lists and dicts of them (without strict it is skipped)"
            )
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        _log.warning(
            "metric is not a number; skipped (this warning is given once per key)",
            source=self.source,
            key=key,
            type=type(value).__name__,
            step=step_idx,
        )

    def conversion_failed(self, key: str, exc: BaseException) -> None:
        """The converter could not turn ``key``'s device value into a float (any thread)."""
        if self.strict and self.failed is None:
            self.failed = exc
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        _log.warning(
            "metric on a device could not be converted; skipped (once per key)",
            source=self.source,
            key=key,
            error=f"{type(exc).__name__}: {exc}",
        )

    def _where(self, step_idx: int) -> str:
        return f"step {step_idx}" if self.source == "step" else self.source
