"""A stand-in for a tensor on a device (no GPU here), and how runs are run in the
runner x step-kind matrix of ``test_convert.py`` and ``test_context.py``.

:class:`OnDevice` is shaped as a CUDA tensor is where the loop looks: a
``device`` whose ``type`` is ``"cuda"``, ``detach()``, ``clone()``, and a
``__float__`` that waits 1 ms (the device draining its queue) and records the
thread that called it, so a test counts where conversions happened.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio

import evsys_async as ev

WAIT = 30.0


class Conversions:
    """Every ``float()`` of every :class:`OnDevice` of one test: the thread's name."""

    def __init__(self) -> None:
        self.threads: list[str] = []
        self.lock = threading.Lock()

    def add(self) -> None:
        with self.lock:
            self.threads.append(threading.current_thread().name)


class _Cuda:
    type = "cuda"


class OnDevice:
    """A 0-d "CUDA tensor" holding ``value`` (see the module docstring)."""

    device = _Cuda()

    def __init__(self, value: float, conversions: Conversions, *, numel: int = 1) -> None:
        self.value = value
        self.conversions = conversions
        self._numel = numel
        #: ``float()`` raises this, as a device error would
        self.error: Exception | None = None

    def detach(self) -> OnDevice:
        return self  # a view of the same storage, as torch's

    def clone(self) -> OnDevice:
        copy = OnDevice(self.value, self.conversions, numel=self._numel)
        copy.error = self.error
        return copy

    def numel(self) -> int:
        return self._numel

    def add_(self, other: float) -> OnDevice:
        self.value += other  # in place, as a running sum is kept
        return self

    def __float__(self) -> float:
        time.sleep(0.001)  # the device drains the kernels queued before this value
        self.conversions.add()
        if self.error is not None:
            raise self.error
        return float(self.value)


RUNNERS = ("run", "run_sync")


def run(loop: ev.TrainingLoop, runner: str, backend: str) -> ev.LoopArtifacts:
    """``await loop.run()`` in this thread (under a deadline), or ``loop.run_sync()``."""
    if runner == "run_sync":
        return loop.run_sync(backend=backend)

    async def main() -> ev.LoopArtifacts:
        with anyio.fail_after(WAIT):
            return await loop.run()

    result: ev.LoopArtifacts = anyio.run(main, backend=backend)
    return result


def step_of(kind: str, body: Callable[[ev.LoopState, int], Any]) -> Any:
    """``body`` as a ``def`` or an ``async def`` step."""
    if kind == "def":
        return body

    async def astep(state: ev.LoopState, step_idx: int) -> Any:
        return body(state, step_idx)

    return astep
