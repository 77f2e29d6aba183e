"""RedisCoordinator: ranks that stop after the same step, agreed through a Redis stream.

Every rank writes to and reads the run's control stream
``evsys:<run_key>:control``. Its entries (string fields) are ``kind`` — one of
``join``, ``hb`` (heartbeat), ``propose``, ``report``, ``leave`` — and
``rank``, ``nonce`` (one per process, to catch two processes claiming a rank),
with ``step``, ``reason``, ``failed``, ``status``, ``error`` where they apply.

* **Joining.** A rank appends ``join`` and reads the stream from its own join
  entry on. It is ready once it has seen every other rank there: their join,
  or the heartbeat each rank sends at once when it sees a join. Any proposal is made by a rank
  that was ready, so it comes after every rank's join entry: no rank misses it,
  and entries an earlier run left in the stream are never read.
* **Stopping.** A rank with a stop request proposes and reports the step it
  finished; every other rank, at its next boundary, reports its step and waits.
  Once every rank has reported (or ended: its last step counts), the agreed
  step is the largest reported. Every rank reads the same stream in the same
  order, so every rank computes the same decision; the first proposal in the
  stream names the reason and ``stop_rank``.
* **Dying.** Each rank heartbeats every ``heartbeat`` seconds. A rank not heard
  from for ``timeout`` seconds is dead, and so, for the others, is one that
  ended ``failed`` or ``cancelled``: the survivors end ``failed`` at their next
  boundary (also while waiting at one), naming it.

All Redis I/O happens in the coordinator's own thread; ``at_boundary`` touches
no socket. While this rank cannot reach Redis it logs one WARNING and declares
no one dead (the others' silence is its own); a boundary waiting on an
agreement longer than ``timeout`` without Redis ends ``failed``.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from .._util.log import get_logger
from ..coordinator import (
    CoordinatorError,
    StopDecision,
    StopRequest,
    at_boundary_in_thread,
    settle_ranks,
)
from . import _redis

__all__ = ["RedisCoordinator"]

_log = get_logger()


def _field(fields: dict[bytes, bytes], name: str, default: str = "") -> str:
    value = fields.get(name.encode())
    return value.decode() if value is not None else default


class RedisCoordinator:
    """Coordinates the ranks of run ``run_key`` through Redis (see the module docstring).

    ``rank`` and ``world_size``, when not given here, come from the loop it is
    given to (``bind_ranks``), else from the launcher's environment
    (``RANK``/``WORLD_SIZE``, else ``SLURM_PROCID``/``SLURM_NTASKS``).
    ``heartbeat`` is the period of this rank's heartbeats, ``timeout`` how long
    a silent rank lives, ``join_timeout`` how long :meth:`start` waits for the
    others, ``poll`` how long one read of the control stream blocks.
    """

    def __init__(
        self,
        url: str = _redis.DEFAULT_URL,
        run_key: str = "run",
        *,
        rank: int | None = None,
        world_size: int | None = None,
        heartbeat: float = 1.0,
        timeout: float = 10.0,
        join_timeout: float = 300.0,
        poll: float = 0.05,
        maxlen: int = 100_000,
        client: Any = None,
    ) -> None:
        #: what this coordinator was given (``None``: not given); the loop's fill the rest
        self._given = (rank, world_size)
        #: why the ranks do not add up yet (a loop's may still: ``bind_ranks``)
        self._unsettled: ValueError | None = None
        try:
            self.rank, self.world_size = settle_ranks((None, None), self._given)
        except ValueError as exc:
            if None not in self._given:  # both given, and they contradict each other
                raise ValueError(f"RedisCoordinator: {exc}") from None
            self.rank, self.world_size = rank or 0, world_size or 1
            self._unsettled = ValueError(f"RedisCoordinator: {exc}")
        if not 0 < heartbeat < timeout or poll <= 0 or join_timeout <= 0:
            raise ValueError(
                "RedisCoordinator: need 0 < heartbeat < timeout and poll, join_timeout > 0, got "
                f"heartbeat={heartbeat}, timeout={timeout}, poll={poll}, "
                f"join_timeout={join_timeout}"
            )
        self.url = url
        self.run_key = run_key
        self.stream = _redis.control_stream(run_key)
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.join_timeout = join_timeout
        self.poll = poll
        self.maxlen = maxlen
        self.nonce = uuid.uuid4().hex
        self._client = client if client is not None else _redis.client(url)
        self._cond = threading.Condition()
        self._outbox: list[dict[str, str]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_id = "$"
        self._next_beat = 0.0
        # what the stream said (the I/O thread writes, under _cond)
        self._nonces: dict[int, str] = {}
        self._seen: dict[int, float] = {}
        self._left: dict[int, tuple[str, int, str]] = {}
        self._proposal: tuple[int, str | None, bool] | None = None
        self._reports: dict[int, int] = {}
        self._decision: StopDecision | None = None
        self._failure: tuple[int, str] | None = None
        self._unreachable_since: float | None = None
        #: set (without the lock) once a proposal or a failure is known: the fast path
        self._attention = False
        self._reported = False
        self._finished = False

    # -- lifecycle ---------------------------------------------------------------------

    def bind_ranks(self, rank: int | None, world_size: int | None) -> None:
        """What the loop was given (``None``: nothing): it fills what this coordinator
        was not given; the environment fills what neither was. Called once by
        ``TrainingLoop``, before :meth:`start`. Raises ``ValueError`` for a value
        given to both that differs."""
        self.rank, self.world_size = settle_ranks((rank, world_size), self._given)
        self._unsettled = None

    def start(self) -> None:
        """Join the run's ranks: blocks until every rank has been seen (or raises
        :class:`CoordinatorError` after ``join_timeout``, or when a rank's world size
        differs or two processes claim one rank)."""
        if self._thread is not None:
            raise RuntimeError("RedisCoordinator.start() was called already; one start per run")
        if self._unsettled is not None:  # given only one of rank, world_size; none came
            raise self._unsettled
        try:
            join_id = self._client.xadd(
                self.stream,
                self._message("join", world_size=str(self.world_size)),
                maxlen=self.maxlen,
                approximate=True,
            )
        except _redis.outage_errors() as exc:
            doing = "join the other ranks"
            raise _redis.RedisUnavailableError.wrap(exc, self.url, doing) from None
        self._last_id = join_id.decode() if isinstance(join_id, bytes) else str(join_id)
        now = time.monotonic()
        self._seen[self.rank] = now
        self._nonces[self.rank] = self.nonce
        self._next_beat = now + self.heartbeat
        self._thread = threading.Thread(
            target=self._run, name=f"evsys-coordinator:{self.run_key}:{self.rank}", daemon=True
        )
        self._thread.start()
        deadline = now + self.join_timeout
        missing: list[int] = []
        with self._cond:
            while len(self._seen) < self.world_size and self._failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(self.world_size)) - set(self._seen))
                    break
                self._cond.wait(left)
            failure = self._failure
        if missing:
            self._stop_thread()
            raise CoordinatorError(
                f"rank {self.rank}: rank(s) {', '.join(map(str, missing))} of "
                f"{self.world_size} did not join run {self.run_key!r} within "
                f"{self.join_timeout:g} s (control stream {self.stream} at "
                f"{_redis.shown(self.url)}); are they started with the same run key "
                "and Redis URL?"
            )
        if failure is not None and failure[1].startswith("conflict:"):
            self._stop_thread()
            raise CoordinatorError(failure[1].removeprefix("conflict:"))

    def finish(self, status: str, steps_completed: int, error: str | None = None) -> None:
        """Tell the others this rank ended; waits up to ``poll`` + 1 s for it to be sent."""
        if self._finished or self._thread is None:
            return
        self._finished = True
        message = self._message(
            "leave", status=status, step=str(steps_completed - 1), error=error or ""
        )
        with self._cond:
            self._outbox.append(message)
            self._cond.notify_all()
        deadline = time.monotonic() + self.poll + 1.0
        with self._cond:
            while self._outbox and time.monotonic() < deadline:
                self._cond.wait(max(0.0, deadline - time.monotonic()))
        self._stop_thread()

    def close(self) -> None:
        """Stop the coordinator's thread without telling the others (``finish`` does)."""
        self._stop_thread()

    def _stop_thread(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.poll + 5.0)
        self._client.close()

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
        once, touching no lock and no socket. Otherwise it reports ``step`` (once per
        stop) and blocks until every rank has, or a rank is found dead. ``abandon``
        (set from elsewhere) makes a wait return ``None`` early.
        """
        if request is None and not self._attention:
            return None
        with self._cond:
            if self._failure is not None:
                return self._failed_decision(step)
            if self._decision is not None:
                return self._decision
            if not self._reported:
                self._reported = True
                if request is not None and self._proposal is None:
                    self._outbox.append(
                        self._message(
                            "propose",
                            step=str(step),
                            reason=request.reason or "",
                            failed="1" if request.failed else "0",
                        )
                    )
                self._outbox.append(self._message("report", step=str(step)))
                self._cond.notify_all()
            while self._decision is None and self._failure is None:
                if abandon is not None and abandon.is_set():
                    return None
                down = self._unreachable_since
                if down is not None and time.monotonic() - down > self.timeout:
                    self._failure = (
                        self.rank,
                        f"rank {self.rank} lost contact with Redis for more than "
                        f"{self.timeout:g} s while the ranks were agreeing on a stop",
                    )
                    break
                self._cond.wait(self.poll)
            if self._failure is not None:
                return self._failed_decision(step)
            return self._decision

    async def at_boundary_async(
        self, step: int, request: StopRequest | None = None
    ) -> StopDecision | None:
        """:meth:`at_boundary` for the event loop's thread: the wait happens in a worker
        thread; cancelling it abandons the wait."""
        if request is None and not self._attention:
            return None
        return await at_boundary_in_thread(self.at_boundary, step, request)

    def _failed_decision(self, step: int) -> StopDecision:
        assert self._failure is not None
        rank, reason = self._failure
        reason = reason.removeprefix("conflict:")
        return StopDecision(step=step, rank=rank, reason=reason, failed=True)

    @property
    def pending(self) -> bool:
        """A stop proposal or a failed rank is known (a flag read, no lock, no I/O)."""
        return self._attention

    # -- what the others see (for tests and logs) -------------------------------------

    @property
    def reports(self) -> dict[int, int]:
        """The step each rank reported for the current stop (a copy)."""
        with self._cond:
            return dict(self._reports)

    @property
    def decision(self) -> StopDecision | None:
        """The agreed stop, once every rank has reported."""
        return self._decision

    # -- the I/O thread ---------------------------------------------------------------

    def _message(self, kind: str, **fields: str) -> dict[str, str]:
        return {"kind": kind, "rank": str(self.rank), "nonce": self.nonce, **fields}

    def _run(self) -> None:
        client = self._client
        while True:
            with self._cond:
                if self._stopping and not self._outbox:
                    return
                outgoing, self._outbox = self._outbox, []
            now = time.monotonic()
            beat = now >= self._next_beat and not self._finished
            try:
                if outgoing or beat:
                    pipe = client.pipeline(transaction=False)
                    for message in outgoing:
                        pipe.xadd(self.stream, message, maxlen=self.maxlen, approximate=True)
                    if beat:
                        pipe.xadd(
                            self.stream,
                            self._message("hb"),
                            maxlen=self.maxlen,
                            approximate=True,
                        )
                    pipe.execute()
                    if beat:
                        self._next_beat = now + self.heartbeat
                block = max(1, int(min(self.poll, self._next_beat - time.monotonic()) * 1000))
                reply = client.xread({self.stream: self._last_id}, count=1000, block=block)
            except Exception as exc:
                with self._cond:
                    self._outbox[:0] = outgoing  # sent again (a duplicate is harmless)
                self._unreachable(exc)
                continue
            self._reachable()
            with self._cond:
                for entry_id, fields in reply[0][1] if reply else ():
                    self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                    self._take(fields)
                self._check_deaths()
                self._cond.notify_all()

    def _unreachable(self, exc: BaseException) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = time.monotonic()
            _log.warning(
                "the coordinator cannot reach Redis; no stop can be agreed until it is back",
                rank=self.rank,
                url=_redis.shown(self.url),
                error=_redis.describe_error(exc, self.url),
            )
        with self._cond:
            self._cond.notify_all()
            self._cond.wait(min(self.poll * 4, 0.5))

    def _reachable(self) -> None:
        if self._unreachable_since is not None:
            self._unreachable_since = None
            now = time.monotonic()
            with self._cond:  # our own silence was not theirs: nobody died meanwhile
                for rank in self._seen:
                    self._seen[rank] = now

    def _take(self, fields: dict[bytes, bytes]) -> None:
        """One control entry (called with the lock held, in stream order)."""
        try:
            rank = int(_field(fields, "rank", "-1"))
        except ValueError:
            return
        if not 0 <= rank < self.world_size:
            return
        kind, nonce = _field(fields, "kind"), _field(fields, "nonce")
        known = self._nonces.setdefault(rank, nonce)
        if known != nonce:
            self._fail(
                rank,
                f"conflict:two processes claim rank {rank} of run {self.run_key!r} (an earlier "
                "run with the same key still running?); give each run its own run key",
            )
            return
        self._seen[rank] = time.monotonic()
        if kind == "join":
            if rank != self.rank:
                self._next_beat = 0.0  # a heartbeat now: the newcomer reads only what follows
            size = _field(fields, "world_size", str(self.world_size))
            if size != str(self.world_size):
                self._fail(
                    rank,
                    f"conflict:rank {rank} joined run {self.run_key!r} with world size {size}, "
                    f"rank {self.rank} with {self.world_size}; start every rank alike",
                )
        elif kind == "propose" and self._proposal is None:
            reason = _field(fields, "reason") or None
            self._proposal = (rank, reason, _field(fields, "failed") == "1")
            self._attention = True
        elif kind == "report":
            self._reports.setdefault(rank, int(_field(fields, "step", "0")))
        elif kind == "leave":
            status, step = _field(fields, "status"), int(_field(fields, "step", "-1"))
            self._left[rank] = (status, step, _field(fields, "error"))
            if status not in ("completed", "stopped") and rank != self.rank:
                error = _field(fields, "error")
                self._fail(rank, f"rank {rank} ended {status}" + (f": {error}" if error else ""))
        self._agree()

    def _agree(self) -> None:
        if self._proposal is None or self._decision is not None:
            return
        steps: list[int] = []
        for rank in range(self.world_size):
            if rank in self._reports:
                steps.append(self._reports[rank])
            elif rank in self._left:
                steps.append(self._left[rank][1])
            else:
                return
        proposer, reason, failed = self._proposal
        self._decision = StopDecision(step=max(steps), rank=proposer, reason=reason, failed=failed)

    def _check_deaths(self) -> None:
        if self._unreachable_since is not None or self._failure is not None:
            return
        now = time.monotonic()
        for rank, seen in self._seen.items():
            if rank != self.rank and rank not in self._left and now - seen > self.timeout:
                self._fail(
                    rank,
                    f"rank {rank} stopped sending heartbeats (none for {now - seen:.1f} s, "
                    f"timeout {self.timeout:g} s); it died or hangs",
                )
                return

    def _fail(self, rank: int, reason: str) -> None:
        if self._failure is None:
            self._failure = (rank, reason)
            self._attention = True
            if reason.startswith("conflict:"):  # the other side reads only what follows
                self._outbox.append(self._message("hb"))
            _log.warning(
                "a rank failed; this rank ends failed at its next step boundary",
                rank=self.rank,
                failed_rank=rank,
                reason=reason.removeprefix("conflict:"),
            )
