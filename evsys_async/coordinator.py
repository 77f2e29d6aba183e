"""The seam between a training loop and whatever keeps its ranks in step.

When training spans several processes (ranks), a stop that one rank decides —
early stopping on rank 0, a NaN on rank 3 — must end every rank after the
same step, and a rank that dies must not leave the others hanging. The loop
does not know how ranks talk; it talks to a :class:`Coordinator`:

* ``start()`` once, before the first step: join the others (blocks until
  every rank is there, or raises :class:`CoordinatorError`);
* ``pending``, a flag read at every step boundary: a stop is being agreed (or a
  rank failed), so this boundary has coordinator work;
* ``at_boundary(step, request)`` after a step whose boundary has work — a local
  stop request, or ``pending`` — on the thread that runs the steps
  (``at_boundary_async`` from the event loop's thread): ``None`` means go
  on — returned at once, without I/O, unless a stop is being agreed; a
  :class:`StopDecision` means run up to ``decision.step`` (inclusive) and end
  with its status, reason and ``stop_rank``. ``request`` is this rank's own
  stop request after that step (``state.request_stop``), or ``None``;
* ``finish(status, steps_completed, error=None)`` once, in the shutdown, so the
  others know this rank ended (and how: a failed rank fails the others too).

The agreement (as :class:`~evsys_async.transports.RedisCoordinator` does it):
a rank that wants to stop proposes; every rank, at its next step boundary,
reports the step it just finished and waits; the agreed step is the largest
reported, so no rank has to undo a step; all run to it and stop. Only the
boundary that follows a proposal waits. An implementation over
``torch.distributed`` (an all-reduce of the stop flag at each boundary, as
Lightning does) fits the same protocol.

**Ranks.** ``rank`` and ``world_size`` are given once: to the loop or to the
coordinator (the same value to both is fine; two different ones are refused).
A coordinator given neither takes the loop's, and the environment launchers set
(:func:`launch_env`) fills only what neither gives (:func:`settle_ranks`). A
coordinator says what it was given through an optional method,
``bind_ranks(rank, world_size)``: ``TrainingLoop`` calls it once, before the
run, with what the loop was given (``None`` where nothing), and reads
``rank`` and ``world_size`` back; it raises ``ValueError`` for a contradiction.
A coordinator without it keeps its own ``rank`` and ``world_size``, and the
loop must agree with them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import msgspec

from ._util.worker import in_daemon_thread
from .errors import EvsysError

__all__ = [
    "Coordinator",
    "CoordinatorError",
    "StopDecision",
    "StopRequest",
    "at_boundary_in_thread",
    "launch_env",
    "settle_ranks",
]


class CoordinatorError(EvsysError, RuntimeError):
    """The ranks could not be brought together (a rank never joined, a world size
    that differs, two processes claiming one rank)."""


class StopRequest(msgspec.Struct, frozen=True):
    """This rank's wish to stop after the step it just finished (``failed``: end with
    status ``failed``, as ``state.request_stop(failed=True)``)."""

    reason: str | None = None
    failed: bool = False


class StopDecision(msgspec.Struct, frozen=True):
    """What every rank does: run up to ``step`` (0-based, inclusive), then end.

    ``rank`` is the rank that asked (or that failed or died: ``TrainEnded.stop_rank``);
    ``reason`` the stop reason; ``failed`` ends with status ``failed`` instead of
    ``stopped``.
    """

    step: int
    rank: int
    reason: str | None = None
    failed: bool = False

    @property
    def status(self) -> str:
        return "failed" if self.failed else "stopped"


@runtime_checkable
class Coordinator(Protocol):
    """What a training loop needs from whatever coordinates its ranks (see the module
    docstring for when each method is called and what it guarantees)."""

    rank: int
    world_size: int

    @property
    def pending(self) -> bool:
        """True once a stop proposal or a failed rank is known: the next boundary has
        work (``at_boundary`` will answer, maybe after a wait). A flag read: no I/O."""
        ...

    def start(self) -> None:
        """Join the other ranks; blocks until all are there. Raises CoordinatorError."""
        ...

    def at_boundary(self, step: int, request: StopRequest | None = None) -> StopDecision | None:
        """After step ``step``: ``None`` (go on; no I/O, no wait) or the decision.
        Blocks only while a stop is being agreed. Call from the thread running steps."""
        ...

    async def at_boundary_async(
        self, step: int, request: StopRequest | None = None
    ) -> StopDecision | None:
        """:meth:`at_boundary` for the event loop's thread: waits without blocking it."""
        ...

    def finish(self, status: str, steps_completed: int, error: str | None = None) -> None:
        """This rank ended with ``status`` (``completed``/``stopped``/``failed``/
        ``cancelled``); tell the others. Never raises; returns within a short bound."""
        ...


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    text = env.get(name)
    if text is None or not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(
            f"${name}={text!r} is not a whole number >= {minimum}; the launcher sets it "
            "(torchrun, accelerate, srun), or unset it for a single process"
        )
    return value


def launch_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` from the environment the usual launchers set:
    ``RANK``/``WORLD_SIZE`` (torchrun, accelerate), else ``SLURM_PROCID``/
    ``SLURM_NTASKS`` (srun), else ``(0, 1)``. Raises ``ValueError`` naming a
    variable that is not a number, or a rank outside the world."""
    env = os.environ if env is None else env
    for rank_name, size_name in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        rank = _env_int(env, rank_name, 0)
        size = _env_int(env, size_name, 1)
        if rank is None and size is None:
            continue
        rank, size = rank or 0, size or 1
        if rank >= size:
            raise ValueError(
                f"${rank_name}={rank} is not below ${size_name}={size}: ranks count from 0"
            )
        return rank, size
    return 0, 1


def settle_ranks(
    loop: tuple[int | None, int | None],
    coordinator: tuple[int | None, int | None] = (None, None),
    *,
    env: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The run's ``(rank, world_size)``: each as given to the loop or to the
    coordinator (``None``: not given), else from the launcher's environment
    (``env``, by default :func:`launch_env`, read only when needed).

    Raises ``ValueError`` naming a value given to both that differs, or a rank
    outside ``[0, world_size)``.
    """
    settled: list[int | None] = []
    for name, mine, its in zip(("rank", "world_size"), loop, coordinator, strict=True):
        if mine is not None and its is not None and mine != its:
            raise ValueError(
                f"{name}={mine} given to the loop contradicts {name}={its} given to the "
                f"coordinator; give it once, to either (the other takes it)"
            )
        settled.append(mine if mine is not None else its)
    rank, size = settled
    if rank is None or size is None:
        env_rank, env_size = launch_env() if env is None else env
        rank = env_rank if rank is None else rank
        size = env_size if size is None else size
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={size}")
    return rank, size


async def at_boundary_in_thread(
    at_boundary: Callable[..., StopDecision | None],
    step: int,
    request: StopRequest | None,
) -> StopDecision | None:
    """A blocking ``at_boundary(step, request, abandon=event)`` awaited from an event
    loop's thread: the wait happens in a daemon worker thread; cancelling the await
    sets ``abandon`` so the worker stops waiting (an implementation's
    ``at_boundary_async`` in one line)."""
    abandon = threading.Event()
    try:
        decision: StopDecision | None = await in_daemon_thread(
            lambda: at_boundary(step, request, abandon=abandon),
            name="evsys-coordinator:boundary",
        )
    finally:
        abandon.set()
    return decision
