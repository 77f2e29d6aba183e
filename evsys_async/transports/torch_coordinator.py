"""TorchDistributedCoordinator: ranks that stop after the same step, agreed over torch.distributed.

For a job launched by ``torchrun`` (or ``torch.multiprocessing``, Lightning's
DDP, accelerate) whose default process group is initialised. Every rank makes
one and passes it to its ``Session`` or ``TrainingLoop``; rank and world size
come from the process group (else from ``RANK``/``WORLD_SIZE``; one process
without a group is a world of one, where a stop is decided at once).

* **Its own group, its own thread.** :meth:`start` makes a gloo group of every
  rank (``torch.distributed.new_group``, a collective call: every rank makes
  it at the same point, as a Session does when it starts) and a daemon thread,
  ``evsys-coordinator:torch:<rank>``, that alone calls collectives on it, so
  the trainer's own collectives (DDP's gradients, on NCCL or gloo) are never
  interleaved with ours, and a step never runs one of ours.
* **Learning of a proposal: a cadence, not a collective per step.** The thread
  runs a *round* every ``interval`` seconds: one all-reduce (a sum) of a small
  int64 tensor holding one row per rank — its stop proposal, the step it
  reported, how it ended. Every rank gets the same rows from the same round,
  so every rank decides the same. ``pending`` (read at every step boundary,
  no I/O) turns true on every rank in the round that carries a proposal or a
  failure: at most ``interval`` plus one round after it was made. While it is
  true the rounds run back to back.
* **The agreement.** A rank that wants to stop proposes (its row, in the next
  round) and reports the step it finished; every other rank, at its first
  boundary after ``pending``, reports its step and waits. The round in which
  every rank has reported (or ended: its last step counts) decides: the
  agreed step is the largest reported, the proposer the lowest rank that
  proposed, its reason fetched with one ``all_gather_object`` in the round
  that first shows the proposal. So the boundary that follows a proposal
  waits for about one round after the slowest rank reaches it, and no other
  boundary waits.
* **Dying.** A rank whose process dies breaks the group: the next round on
  every other rank raises at once (gloo sees the connection reset), and each
  ends ``failed`` at its next boundary, naming the lost contact (the rank that
  died cannot be told apart from here: ``stop_rank`` is this rank's own, as
  when the Redis coordinator loses Redis). A rank that is alive but silent
  (frozen, its thread never scheduled) holds the others' round until the
  group's ``timeout``, torch's own, then the same. A rank that ends
  ``failed`` or ``cancelled`` says so in its row: the others end ``failed``
  at their next boundary, naming it and its error.
* **Ending.** :meth:`finish` puts this rank's status in its row and waits, at
  most ``finish_timeout``, for the round in which every rank has ended; then
  the thread stops on every rank alike. Past ``finish_timeout`` it returns and
  its thread goes on taking part in rounds (a daemon) so the others can end.
"""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

from .._util.log import get_logger
from ..coordinator import (
    CoordinatorError,
    StopDecision,
    StopRequest,
    at_boundary_in_thread,
    launch_env,
)
from ..errors import import_extra

__all__ = ["TorchDistributedCoordinator"]

_log = get_logger()

#: a rank's row in a round: its proposal (0 none, 1 stop, 2 stop as failed), the step it
#: reported + 1 (0: none yet), how it ended (0: running, else _STATUSES' index + 1) and
#: its last step + 2 (read only once it ended; a rank that ended before its first step
#: has last step -1)
_FIELDS = 4
_STATUSES = ("completed", "stopped", "failed", "cancelled")


class TorchDistributedCoordinator:
    """Coordinates the ranks of a ``torch.distributed`` job (see the module docstring).

    ``interval`` is the time between two rounds while nothing is being agreed,
    ``timeout`` the group's own timeout (how long :meth:`start` waits for every
    rank, and a silent rank holds a round), ``finish_timeout`` how long
    :meth:`finish` waits for the other ranks to end. Raises
    :class:`~evsys_async.errors.MissingExtraError` (extra ``torch``) without torch.
    """

    def __init__(
        self,
        *,
        interval: float = 0.1,
        timeout: float = 300.0,
        finish_timeout: float = 60.0,
    ) -> None:
        if interval <= 0 or timeout <= 0 or finish_timeout <= 0:
            raise ValueError(
                "TorchDistributedCoordinator: interval, timeout and finish_timeout must be "
                f"> 0 seconds, got interval={interval}, timeout={timeout}, "
                f"finish_timeout={finish_timeout}"
            )
        self._torch = import_extra("torch", "torch", "TorchDistributedCoordinator")
        self._dist: Any = import_extra("torch.distributed", "torch", "TorchDistributedCoordinator")
        self.interval = interval
        self.timeout = timeout
        self.finish_timeout = finish_timeout
        self.rank, self.world_size = self._ranks()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._group: Any = None
        #: what this rank puts in its row (under _cond)
        self._row = [0] * _FIELDS
        self._texts: tuple[str | None, str | None] = (None, None)  # (reason, error)
        #: what the rounds said (the thread writes, under _cond)
        self._rounds = 0
        self._proposal: tuple[int, str | None, bool] | None = None
        self._decision: StopDecision | None = None
        self._failure: tuple[int, str] | None = None
        self._fetched: set[int] = set()
        #: every rank's (reason, error), as the last all_gather_object brought them
        self._gathered: list[Any] = [(None, None)] * self.world_size
        self._all_ended = False
        #: set without the lock once a proposal or a failure is known: the fast path
        self._attention = False
        self._started = False
        self._reported = False

    def _ranks(self) -> tuple[int, int]:
        dist = self._dist
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
        return launch_env()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Make the coordinator's gloo group and its thread; block until every rank has
        done the same (one round). Raises :class:`CoordinatorError` when the process
        group is not initialised in a world of several ranks, or a rank did not come
        within ``timeout``."""
        if self._started:
            raise RuntimeError("TorchDistributedCoordinator.start() was called already")
        self._started = True
        dist = self._dist
        if not (dist.is_available() and dist.is_initialized()):
            if self.world_size > 1:
                raise CoordinatorError(
                    f"TorchDistributedCoordinator: rank {self.rank} of {self.world_size}, but "
                    "torch.distributed has no process group; call "
                    "torch.distributed.init_process_group() first (torchrun sets what it reads)"
                )
            return
        self.rank, self.world_size = self._ranks()
        if self.world_size == 1:
            return
        self._gathered = [(None, None)] * self.world_size
        try:
            self._group = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=self.timeout)
            )
        except Exception as exc:
            raise CoordinatorError(
                f"rank {self.rank}: the ranks did not all make the coordinator's group within "
                f"{self.timeout:g} s ({exc}); does every rank start its session?"
            ) from exc
        self._thread = threading.Thread(
            target=self._run, name=f"evsys-coordinator:torch:{self.rank}", daemon=True
        )
        self._thread.start()
        with self._cond:
            while self._rounds == 0 and self._failure is None:
                self._cond.wait()
            failure = self._failure
        if failure is not None:
            raise CoordinatorError(failure[1])

    def finish(self, status: str, steps_completed: int, error: str | None = None) -> None:
        """This rank ended with ``status``: tell the others, and wait (at most
        ``finish_timeout``) until every rank has ended. Never raises."""
        if self._thread is None:
            return
        code = _STATUSES.index(status if status in _STATUSES else "failed") + 1
        deadline = time.monotonic() + self.finish_timeout
        with self._cond:
            self._row[2], self._row[3] = code, steps_completed + 1  # last step + 2
            self._texts = (self._texts[0], error)
            self._cond.notify_all()
            while not self._all_ended and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    _log.warning(
                        "the other ranks did not end within finish_timeout; this rank goes on",
                        rank=self.rank,
                        finish_timeout=self.finish_timeout,
                    )
                    return
                self._cond.wait(left)

    # -- the step boundary ------------------------------------------------------------

    def at_boundary(
        self,
        step: int,
        request: StopRequest | None = None,
        *,
        abandon: threading.Event | None = None,
    ) -> StopDecision | None:
        """After step ``step``: ``None`` to go on, else the decision (see the protocol).

        Without a proposal or a failure known and without ``request`` it returns at
        once, touching no lock. Otherwise it reports ``step`` (once per stop) and
        blocks until every rank has, or the group failed. ``abandon`` (set from
        elsewhere) makes a wait return ``None`` early.
        """
        if request is None and not self._attention:
            return None
        if self._thread is None:  # a world of one: nobody to agree with
            if request is None:
                return None
            return StopDecision(
                step=step, rank=self.rank, reason=request.reason, failed=request.failed
            )
        with self._cond:
            if self._failure is None and self._decision is None and not self._reported:
                self._reported = True
                self._row[1] = step + 1
                if request is not None:
                    self._row[0] = 2 if request.failed else 1
                    self._texts = (request.reason, self._texts[1])
                self._cond.notify_all()
            while self._decision is None and self._failure is None:
                if abandon is not None and abandon.is_set():
                    return None
                self._cond.wait(0.05)
            if self._failure is not None:
                rank, reason = self._failure
                return StopDecision(step=step, rank=rank, reason=reason, failed=True)
            return self._decision

    async def at_boundary_async(
        self, step: int, request: StopRequest | None = None
    ) -> StopDecision | None:
        """:meth:`at_boundary` for the event loop's thread: the wait happens in a worker
        thread; cancelling it abandons the wait."""
        if request is None and not self._attention:
            return None
        return await at_boundary_in_thread(self.at_boundary, step, request)

    @property
    def pending(self) -> bool:
        """A stop proposal or a failed rank is known (a flag read, no lock, no I/O)."""
        return self._attention

    @property
    def decision(self) -> StopDecision | None:
        """The agreed stop, once every rank has reported."""
        return self._decision

    # -- the rounds (the coordinator's thread) ------------------------------------------

    def _run(self) -> None:
        torch, dist = self._torch, self._dist
        size = self.world_size * _FIELDS
        while True:
            with self._cond:
                mine = list(self._row)
            rows = torch.zeros(size, dtype=torch.int64)
            rows[self.rank * _FIELDS : (self.rank + 1) * _FIELDS] = torch.tensor(mine)
            try:
                dist.all_reduce(rows, group=self._group)
                table = rows.view(self.world_size, _FIELDS).tolist()
                self._fetch_texts(table)
            except Exception as exc:
                self._broken(exc)
                return
            with self._cond:
                self._take(table)
                self._rounds += 1
                self._cond.notify_all()
                if self._all_ended:
                    return
                # while a stop is agreed, rounds follow closely; a report or an end
                # wakes this rank's thread early (the others' come within their pause)
                self._cond.wait(self.interval / 20 if self._attention else self.interval)

    def _fetch_texts(self, table: list[list[int]]) -> None:
        """In the round that first shows a proposal or a failed end: every rank's reason
        and error (every rank sees the same table, so every rank calls this alike)."""
        new = {r for r, row in enumerate(table) if row[0] or row[2] > 2} - self._fetched
        if not new:
            return
        with self._cond:
            mine = self._texts
        texts: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(texts, mine, group=self._group)
        with self._cond:
            self._fetched |= new
            self._gathered = texts

    def _take(self, table: list[list[int]]) -> None:
        """One round's rows (with the lock held): the proposal, failures, the decision."""
        texts = self._gathered
        if self._proposal is None:
            proposers = [r for r, row in enumerate(table) if row[0]]
            if proposers:
                first = proposers[0]
                self._proposal = (first, texts[first][0], table[first][0] == 2)
                self._attention = True
        for r, row in enumerate(table):
            if row[2] > 2 and r != self.rank and self._failure is None:  # failed, cancelled
                error = texts[r][1]
                status = _STATUSES[row[2] - 1]
                self._fail(r, f"rank {r} ended {status}" + (f": {error}" if error else ""))
        self._all_ended = all(row[2] for row in table)
        if self._proposal is not None and self._decision is None:
            # each rank's reported step, or its last one if it ended
            steps = [row[1] - 1 if row[1] else row[3] - 2 for row in table if row[1] or row[2]]
            if len(steps) == self.world_size:
                proposer, reason, failed = self._proposal
                self._decision = StopDecision(
                    step=max(steps), rank=proposer, reason=reason, failed=failed
                )

    def _broken(self, exc: BaseException) -> None:
        with self._cond:
            if self._all_ended:
                return
            self._fail(
                self.rank,
                f"rank {self.rank} lost contact with the other ranks: the coordinator's "
                f"process group failed ({_first_line(exc)}); a rank died, or hangs past the "
                "group's timeout",
            )
            self._cond.notify_all()

    def _fail(self, rank: int, reason: str) -> None:
        if self._failure is None:
            self._failure = (rank, reason)
            self._attention = True
            _log.warning(
                "a rank failed; this rank ends failed at its next step boundary",
                rank=self.rank,
                failed_rank=rank,
                reason=reason,
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"
