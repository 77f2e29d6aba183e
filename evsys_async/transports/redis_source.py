"""RedisStreamSource: a run's event stream back onto a local bus, at least once.

With a consumer ``group`` (``XREADGROUP``) an entry is acknowledged (``XACK``)
only after its event was published on the local bus and every subscriber
handled it (``bus.drain``), so a consumer killed at any moment and started
again with the same group and consumer name misses nothing: it reads its own
pending entries first, then new ones; entries another consumer of the group
left pending longer than ``claim_after`` seconds (it died) are taken over with
``XAUTOCLAIM``. What arrives twice (a sink's retried chunk, a claimed entry,
a restart) is dropped by a window of recently seen ``(bus_id, seq)`` — a
window, not a high-water mark, because claimed entries arrive out of order.
An entry that does not decode is logged with its stream id, copied to the
dead-letter stream ``evsys:<run_key>:dead`` with the reason, and acknowledged;
it never stops the consumer. Neither does Redis going away: the source logs
one WARNING per outage and reads on when it is back (a group that vanished
with a restarted Redis is created again).

A consumer that restarts resumes like ``run(start_step=k)``:
:meth:`RedisStreamSource.prepare` finds k, the step of the first entry the
group has not acknowledged, and the source first re-publishes the already
acknowledged entries of step k and later, so writers that drop their rows
from step k on (``state.start_step``) end with the files of an uninterrupted
consumer (docs/distributed.md).

Without a group the source reads with ``XREAD`` from ``start`` and
acknowledges nothing: an observer (``evsys-async tail``).

Redis I/O and decoding run in the source's own daemon thread with redis-py's
blocking client; publishing and draining happen on the event loop, so the
source works on asyncio and on trio.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from .._util.log import get_logger
from .._util.worker import DaemonWorker
from ..events import Envelope, Event, decode_envelope
from . import _redis

__all__ = ["RedisSourceStats", "RedisStreamSource", "ResumePoint"]

_log = get_logger()

#: how far a restarted consumer looks back for the start of step k
_BACKSCAN_LIMIT = 100_000
_PAGE = 256


class ResumePoint(msgspec.Struct, frozen=True):
    """Where a consumer group that has consumed part of a stream picks up.

    ``start_step`` is k: writers drop their rows from it on. ``replay_from``
    is the first entry (inclusive) re-published although the group had
    acknowledged it (it belongs to step k or later); ``first_unacked`` is the
    first entry the group had not acknowledged (``None``: all were).
    """

    start_step: int
    replay_from: str
    first_unacked: str | None


class RedisSourceStats(msgspec.Struct, frozen=True):
    """A source's counters: entries ``read``; events ``published`` on the local bus;
    ``replayed`` of those re-published on a resume; ``duplicates`` dropped by the
    window; ``skipped`` (another rank's, or the local bus's own); ``dead`` entries
    sent to the dead-letter stream; ``acked``; ``claimed`` from dead consumers;
    ``outages`` of Redis."""

    read: int
    published: int
    replayed: int
    duplicates: int
    skipped: int
    dead: int
    acked: int
    claimed: int
    outages: int


class _Entry(msgspec.Struct, gc=False):
    id: bytes | str  # as redis-py returns it (acknowledged as is)
    fields: dict[bytes, bytes] | None
    envelope: Envelope | None
    error: str | None
    ack: bool  # acknowledged once handled (group mode, not a replayed entry)


class _Prefetch:
    """The next batch, read in the source's thread while the loop handles this one."""

    def __init__(self, tg: Any, worker: DaemonWorker, read: Callable[[], Any]) -> None:
        self._tg, self._worker, self._read = tg, worker, read
        self._start()

    def _start(self) -> None:
        self._done = anyio.Event()
        self._value: Any = None
        self._error: Exception | None = None
        self._tg.start_soon(self._run, self._done)

    async def _run(self, done: anyio.Event) -> None:
        try:
            self._value = await self._worker.call(self._read)
        except Exception as exc:  # handed to take(); a cancellation propagates
            self._error = exc
        done.set()

    async def take(self) -> Any:
        """The batch read meanwhile (re-raising what the read raised); starts the next."""
        await self._done.wait()
        value, error = self._value, self._error
        if error is not None:
            raise error
        self._start()
        return value


#: an event of a type not defined here (a user's, not importable in this process) comes
#: through as an UnknownEvent, not as a dead letter
_decode_envelope = functools.partial(decode_envelope, keep_unknown=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _step_of(event: Event) -> int | None:
    step = getattr(event, "step", None)
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class RedisStreamSource:
    """Reads a run's stream and publishes its events onto a local bus.

    ``run_key`` names the stream ``evsys:<run_key>:events`` (``stream``
    overrides it). With ``group``, an at-least-once consumer of that group
    named ``consumer`` (default: this host's name, stable across restarts;
    give each consumer of one group on one host its own name). ``rank``
    keeps only that rank's events (the others are acknowledged unread: every
    consumer of a group should use the same filter). ``start`` is where a new
    group (or, without a group, the reader) begins: ``"0"`` the stream's
    start, ``"$"`` only new entries. ``dedupe_window`` is how many recent
    ``(bus_id, seq)`` are remembered. ``drain_timeout`` is how long one wait
    for the local subscribers lasts before a WARNING (the wait goes on).
    """

    def __init__(
        self,
        url: str = _redis.DEFAULT_URL,
        run_key: str | None = None,
        *,
        group: str | None = None,
        consumer: str | None = None,
        rank: int | None = None,
        claim_after: float = 30.0,
        stream: str | None = None,
        start: str = "0",
        block_ms: int = 200,
        count: int = 512,
        dedupe_window: int = 65_536,
        drain_timeout: float = 60.0,
        client: Any = None,
    ) -> None:
        if stream is None and run_key is None:
            raise ValueError(
                "RedisStreamSource: give the run's key (the stream is evsys:<run_key>:events) "
                "or stream="
            )
        if count < 1 or block_ms < 1 or dedupe_window < 1 or claim_after <= 0:
            raise ValueError(
                "RedisStreamSource: count, block_ms and dedupe_window must be >= 1 and "
                f"claim_after > 0, got count={count}, block_ms={block_ms}, "
                f"dedupe_window={dedupe_window}, claim_after={claim_after}"
            )
        if consumer is not None and group is None:
            raise ValueError("RedisStreamSource: consumer= needs group=")
        self.url = url
        self.run_key = run_key
        self.stream = stream or _redis.events_stream(run_key or "")
        self.dead_stream = (
            _redis.dead_stream(run_key) if stream is None and run_key else f"{self.stream}:dead"
        )
        self.group = group
        self.consumer = consumer or (socket.gethostname() if group is not None else None)
        self.rank = rank
        self.claim_after = claim_after
        self.start = start
        self.block_ms = block_ms
        self.count = count
        self.drain_timeout = drain_timeout
        self._client = client if client is not None else _redis.client(url)
        self._seen: set[tuple[str, int]] = set()
        self._order: deque[tuple[str, int]] = deque()
        self._window = dedupe_window
        self._prepared = False
        self._resume: ResumePoint | None = None
        self._replay_cursor: str | None = None  # exclusive; None: replay done or none
        self._mode = "pending"
        self._cursor = "0"
        self._last_id = start  # XREAD mode: the last entry handled
        self._read_id = start  # XREAD mode: the last entry read (the next batch may be read early)
        self._next_claim = 0.0
        #: the server-side script that reads new entries (None: plain XREADGROUP)
        self._read_sha: str | None = _redis.sha1(_redis.READ_GROUP)
        self._down_since: float | None = None
        self._closed = False  # close() was called: a failing read is no outage
        self._counts = dict.fromkeys(RedisSourceStats.__struct_fields__, 0)

    # -- resuming --------------------------------------------------------------------

    def prepare(self) -> ResumePoint | None:
        """Connect; with a group, create it if missing and find where it resumes.

        Blocking (call it from a thread, or let :meth:`forward` do it). Returns
        ``None`` for a new group (or without one); otherwise the
        :class:`ResumePoint`. Idempotent. Raises
        :class:`~evsys_async.transports.RedisUnavailableError` when Redis does not answer.
        """
        if self._prepared:
            return self._resume
        try:
            self._client.ping()
        except _redis.outage_errors() as exc:
            raise _redis.RedisUnavailableError.wrap(
                exc, self.url, "read the run's stream"
            ) from None
        if self.group is not None:
            self._resume = self._find_resume_point() if not self._create_group() else None
            resume = self._resume
            if resume is not None and resume.replay_from not in ("+", resume.first_unacked):
                self._replay_cursor = "-" if resume.replay_from == "0" else resume.replay_from
        self._prepared = True
        return self._resume

    def stream_exists(self) -> bool:
        """Does the run's stream exist yet (a run that sends to it has started)?

        Blocking, one ``EXISTS``. Raises
        :class:`~evsys_async.transports.RedisUnavailableError` when Redis does not answer.
        """
        try:
            return bool(self._client.exists(self.stream))
        except _redis.outage_errors() as exc:
            raise _redis.RedisUnavailableError.wrap(
                exc, self.url, "read the run's stream"
            ) from None

    def _create_group(self) -> bool:
        """True if the group was created now (nothing consumed yet)."""
        redis = _redis.redis_module()
        try:
            self._client.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        return True

    def _decode(self, fields: dict[bytes, bytes] | None) -> Envelope | None:
        if not fields:
            return None
        data = fields.get(b"envelope")
        if data is None:
            return None
        try:
            return _decode_envelope(data)
        except Exception:
            return None

    def _mine(self, envelope: Envelope) -> bool:
        return self.rank is None or envelope.event.rank == self.rank

    def _find_resume_point(self) -> ResumePoint | None:
        found = self._first_unacked()
        if found is None:
            return None  # the group exists but consumed nothing: a fresh start
        (first_unacked,) = found
        k = self._first_step(first_unacked) if first_unacked is not None else None
        k, replay_from = self._step_k_starts(first_unacked, k)
        return ResumePoint(start_step=k, replay_from=replay_from, first_unacked=first_unacked)

    def _first_unacked(self) -> tuple[str | None] | None:
        """``(id,)`` of the group's first unacknowledged entry (``(None,)``: all were),
        or ``None`` when the group has consumed nothing yet."""
        client, stream = self._client, self.stream
        info = next(
            (g for g in client.xinfo_groups(stream) if _text(g["name"]) == self.group), None
        )
        if info is None:
            return None
        last_delivered = _text(info["last-delivered-id"])
        pending = client.xpending(stream, self.group)
        if pending and pending.get("pending"):
            return (_text(pending["min"]),)
        if last_delivered in ("0-0", "0"):
            return None
        after = client.xrange(stream, f"({last_delivered}", "+", count=1)
        return (_text(after[0][0]) if after else None,)

    def _first_step(self, first_unacked: str) -> int | None:
        """k: the step of the first entry from ``first_unacked`` on that has one."""
        cursor, scanned = first_unacked, 0
        while scanned < _BACKSCAN_LIMIT:
            page = self._client.xrange(self.stream, cursor, "+", count=_PAGE)
            if not page:
                return None
            for _, fields in page:
                env = self._decode(fields)
                if env is not None and self._mine(env) and _step_of(env.event) is not None:
                    return _step_of(env.event)
            scanned += len(page)
            cursor = f"({_text(page[-1][0])}"
        return None

    def _step_k_starts(self, first_unacked: str | None, k: int | None) -> tuple[int, str]:
        """Back from the first unacknowledged entry: where the entries of step k and later
        begin (they are handed again), and k itself when no unacknowledged entry had a
        step (the step after the last handled one). A group that began at ``$`` never saw
        the entries before it: nothing to go back to."""
        from_start = self.start in ("0", "0-0", "-")
        end = f"({first_unacked}" if first_unacked is not None else "+"
        replay_from = first_unacked or "+"
        scanned = 0 if from_start else _BACKSCAN_LIMIT
        while scanned < _BACKSCAN_LIMIT:
            page = self._client.xrevrange(self.stream, end, "-", count=_PAGE)
            if not page:
                replay_from = "0"  # reached the stream's start
                break
            for entry_id, fields in page:
                env = self._decode(fields)
                step = _step_of(env.event) if env is not None and self._mine(env) else None
                if step is not None and (k is None or step < k):
                    return (step + 1 if k is None else k), replay_from
                replay_from = _text(entry_id)
            scanned += len(page)
            end = f"({_text(page[-1][0])}"
        if k is None:
            return 0, ("0" if from_start else first_unacked or "+")
        return k, replay_from

    # -- reading (the source's thread) ----------------------------------------------------

    def _entries(self, raw: list[Any], *, ack: bool) -> list[_Entry]:
        out: list[_Entry] = []
        append, decode = out.append, _decode_envelope
        for entry_id, fields in raw:
            if fields is None:  # trimmed away while pending: nothing to handle
                append(_Entry(entry_id, None, None, None, ack))
                continue
            data = fields.get(b"envelope")
            try:
                if data is None:
                    raise ValueError("the entry has no 'envelope' field")
                append(_Entry(entry_id, fields, decode(data), None, ack))
            except Exception as exc:
                append(_Entry(entry_id, fields, None, str(exc), ack))
        return out

    def _next_batch(self) -> list[_Entry]:
        """The next entries to handle; an empty list after ``block_ms`` without any, or
        after a backoff while Redis is away (one WARNING per outage)."""
        try:
            self.prepare()
            batch = self._read()
        except Exception as exc:
            if self._closed:
                # closed under a read still blocked in Redis (forward returned, and the
                # prefetched read was left to end): not an outage, and nobody waits for it
                return []
            if self._recover(exc):
                return []
            raise
        if self._down_since is not None:
            _log.info(
                "Redis reachable again; the source reads on",
                stream=self.stream,
                url=_redis.shown(self.url),
                outage_seconds=round(time.monotonic() - self._down_since, 3),
            )
            self._down_since = None
        self._counts["read"] += len(batch)
        return batch

    def _read(self) -> list[_Entry]:
        client, stream = self._client, self.stream
        if self.group is None:
            reply = client.xread({stream: self._read_id}, count=self.count, block=self.block_ms)
            raw = reply[0][1] if reply else []
            if raw:
                self._read_id = _text(raw[-1][0])
            return self._entries(raw, ack=False)
        if self._replay_cursor is not None:
            assert self._resume is not None
            first = self._resume.first_unacked
            end = f"({first}" if first is not None else "+"
            page = client.xrange(stream, self._replay_cursor, end, count=self.count)
            if page:
                self._replay_cursor = f"({_text(page[-1][0])}"
                return self._entries(page, ack=False)
            self._replay_cursor = None
        if self._mode == "pending":  # our own pending entries first (a restart)
            reply = client.xreadgroup(
                self.group, self.consumer, {stream: self._cursor}, count=self.count
            )
            raw = reply[0][1] if reply else []
            if raw:
                self._cursor = _text(raw[-1][0])
                return self._entries(raw, ack=True)
            self._mode = "live"
        now = time.monotonic()
        if now >= self._next_claim:
            self._next_claim = now + max(0.5, self.claim_after / 2)
            _, claimed, *_ = client.xautoclaim(
                stream,
                self.group,
                self.consumer,
                min_idle_time=int(self.claim_after * 1000),
                start_id="0-0",
                count=self.count,
            )
            if claimed:
                self._counts["claimed"] += len(claimed)
                self._next_claim = now  # there may be more
                return self._entries(claimed, ack=True)
        if self._read_sha is None:
            reply = client.xreadgroup(
                self.group, self.consumer, {stream: ">"}, count=self.count, block=self.block_ms
            )
            return self._entries(reply[0][1] if reply else [], ack=True)
        entries = self._read_by_script()
        if entries:
            return entries
        # nothing new: wait for the next entry, then take what came with it in one go
        reply = client.xreadgroup(
            self.group, self.consumer, {stream: ">"}, count=1, block=self.block_ms
        )
        woken = self._entries(reply[0][1] if reply else [], ack=True)
        return woken + self._read_by_script() if woken else woken

    def _read_by_script(self) -> list[_Entry]:
        """New entries through the server-side script (one flat reply: cheap to parse);
        ``[]`` when there are none (the caller then waits with a blocking read)."""
        redis = _redis.redis_module()
        args = (1, self.stream, self.group, self.consumer, self.count)
        try:
            try:
                ids, bodies = self._client.evalsha(self._read_sha, *args)
            except redis.exceptions.NoScriptError:  # a restarted Redis forgot it
                self._client.script_load(_redis.READ_GROUP)
                ids, bodies = self._client.evalsha(self._read_sha, *args)
        except redis.ResponseError as exc:
            if not _redis.script_refused(exc):
                raise
            self._read_sha = None  # plain XREADGROUP from now on
            return []
        if not ids:
            return []
        out: list[_Entry] = []
        append, decode = out.append, _decode_envelope
        for entry_id, body in zip(ids.split(b" "), bodies.split(b"\n"), strict=True):
            if body:
                try:
                    append(_Entry(entry_id, None, decode(body), None, True))
                    continue
                except Exception:
                    pass
            # not a plain envelope (or trimmed away): read the entry as it is
            found = self._client.xrange(self.stream, entry_id, entry_id)
            fields = found[0][1] if found else None
            out += self._entries([(entry_id, fields)], ack=True)
        return out

    def _recover(self, exc: BaseException) -> bool:
        """Handle a failed read: True if it is worth trying again (after a backoff)."""
        redis = _redis.redis_module()
        if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
            _log.warning(
                "the consumer group is gone (Redis restarted without persistence, or the "
                "stream was deleted); created again, reading the stream from its start",
                stream=self.stream,
                group=self.group,
            )
            with contextlib.suppress(*_redis.outage_errors()):
                self._create_group()
            self._mode, self._cursor, self._replay_cursor = "pending", "0", None
            return True
        if not isinstance(exc, _redis.outage_errors()):
            return False
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._counts["outages"] += 1
            _log.warning(
                "Redis unreachable; the source reads on when it is back",
                stream=self.stream,
                url=_redis.shown(self.url),
                error=_redis.describe_error(exc, self.url),
            )
        down = time.monotonic() - self._down_since
        time.sleep(min(2.0, 0.05 * 2 ** min(down, 6)))
        return True

    def _settle(self, ids: list[bytes | str], dead: list[_Entry]) -> None:
        """Acknowledge ``ids`` and copy ``dead`` entries to the dead-letter stream, in one
        round trip; retried while Redis is away (at least once: a lost ack re-delivers)."""
        while True:
            try:
                pipe = self._client.pipeline(transaction=False)
                for entry in dead:
                    fields: dict[Any, Any] = dict(entry.fields or {})
                    fields.update(
                        source_stream=self.stream,
                        source_id=_text(entry.id),
                        group=self.group or "",
                        error=entry.error or "",
                    )
                    pipe.xadd(self.dead_stream, fields)
                if ids and self.group is not None:
                    pipe.xack(self.stream, self.group, *ids)
                pipe.execute()
                self._counts["acked"] += len(ids) if self.group is not None else 0
                self._counts["dead"] += len(dead)
                return
            except Exception as exc:
                if not self._recover(exc):
                    raise

    # -- the event loop --------------------------------------------------------------

    async def forward(
        self,
        bus: Any,
        *,
        until: Callable[[Event], bool] | None = None,
        on_envelope: Callable[[Envelope], None] | None = None,
    ) -> int:
        """Publish the stream's events onto ``bus`` until cancelled, or until
        ``until(event)`` is true for a published event (entries after it stay
        unacknowledged). Returns how many events were published.

        ``on_envelope(envelope)`` runs on the event loop just before each
        publish (the wire envelope: its ``bus_id``/``seq`` are the producer's).
        With a group, each batch is acknowledged after ``bus.drain()`` says every
        subscriber handled it. The next batch is read (in the source's thread)
        while the local subscribers handle this one. Cancelling stops within
        ``block_ms``; what was read and not acknowledged is read again by the
        next ``forward`` or consumer (a consumer reads its own pending entries first).
        """
        reader = DaemonWorker(f"evsys-redis-source:{self.stream}")
        acker = DaemonWorker(f"evsys-redis-ack:{self.stream}")
        self._mode, self._cursor, self._read_id = "pending", "0", self._last_id
        published = 0
        try:
            # acknowledgements go out in order from their own thread while the next batch
            # is handled; leaving this block waits for them
            async with anyio.create_task_group() as acks_tg, anyio.create_task_group() as tg:
                prefetch = _Prefetch(tg, reader, self._next_batch)
                while True:
                    batch: list[_Entry] = await prefetch.take()
                    acks, dead, fresh, stop = self._publish(batch, bus, until, on_envelope)
                    published += fresh
                    if fresh:
                        await self._drain(bus)
                    if acks or dead:
                        acks_tg.start_soon(self._ack, acker, acks, dead)
                    if stop:
                        tg.cancel_scope.cancel()
                        break
        finally:
            reader.close()
            acker.close()
        return published

    def _publish(
        self,
        batch: list[_Entry],
        bus: Any,
        until: Callable[[Event], bool] | None,
        on_envelope: Callable[[Envelope], None] | None,
    ) -> tuple[list[bytes | str], list[_Entry], int, bool]:
        """Publish a batch's new events; returns the ids to acknowledge, the dead letters,
        how many were published and whether ``until`` said stop (the rest stay unread)."""
        acks: list[bytes | str] = []
        dead: list[_Entry] = []
        handled = fresh = skipped = duplicates = replayed = 0
        stop = False
        own_bus, rank, publish = bus.bus_id, self.rank, bus.publish
        seen, order, window = self._seen, self._order, self._window
        for entry in batch:
            handled += 1
            if entry.ack:
                acks.append(entry.id)
            env = entry.envelope
            if env is None:
                if entry.fields is not None:
                    self._dead_letter(entry, dead)
                continue
            if env.bus_id == own_bus or (rank is not None and env.event.rank != rank):
                skipped += 1
                continue
            key = (env.bus_id, env.seq)  # the window of recently seen envelopes
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            order.append(key)
            if len(order) > window:
                seen.discard(order.popleft())
            if on_envelope is not None:
                on_envelope(env)
            publish(env.event)
            fresh += 1
            replayed += not entry.ack
            if until is not None and until(env.event):
                stop = True
                break
        counts = self._counts
        counts["published"] += fresh
        counts["skipped"] += skipped
        counts["duplicates"] += duplicates
        if self.group is not None:
            counts["replayed"] += replayed
        if handled and self.group is None:
            self._last_id = _text(batch[handled - 1].id)
        return acks, dead, fresh, stop

    async def _ack(self, acker: DaemonWorker, ids: list[bytes | str], dead: list[_Entry]) -> None:
        try:
            await acker.call(self._settle, ids, dead)
        except Exception as exc:  # at least once still holds: they are delivered again
            _log.warning(
                "acknowledging a handled batch failed; its entries will be delivered again",
                stream=self.stream,
                entries=len(ids),
                error=_redis.describe_error(exc, self.url),
            )

    def _dead_letter(self, entry: _Entry, dead: list[_Entry]) -> None:
        _log.warning(
            "stream entry does not decode; "
            + ("copied to the dead-letter stream and acknowledged" if self.group else "skipped"),
            stream=self.stream,
            entry=_text(entry.id),
            dead_stream=self.dead_stream if self.group else None,
            error=entry.error,
        )
        if self.group is not None:
            dead.append(entry)

    async def _drain(self, bus: Any) -> None:
        while not (report := await bus.drain(self.drain_timeout)).ok:
            _log.warning(
                "local subscribers have not handled the batch yet; it stays unacknowledged "
                "until they have",
                stream=self.stream,
                pending=dict(report.pending),
            )

    # -- where a consumer wrote --------------------------------------------------------

    def _record(self) -> tuple[str, str]:
        return _redis.stream_name(self.run_key or self.stream, "consumers"), (
            f"{self.group}/{self.consumer}"
        )

    def record_dir(self, path: str) -> None:
        """Remember (in Redis, ``evsys:<run_key>:consumers``) the directory this group's
        consumer writes into, so a restarted consumer finds it again. Blocking."""
        key, name = self._record()
        self._client.hset(key, name, path)

    def recorded_dir(self) -> str | None:
        """The directory :meth:`record_dir` remembered for this group and consumer."""
        key, name = self._record()
        value = self._client.hget(key, name)
        return _text(value) if value is not None else None

    # -- the rest ------------------------------------------------------------------------

    def stats(self) -> RedisSourceStats:
        """The source's counters now."""
        return RedisSourceStats(**self._counts)

    def close(self) -> None:
        """Release the client. A read still blocked in Redis (the one ``forward`` had
        prefetched when it returned) then ends quietly: closing is not an outage."""
        self._closed = True
        self._client.close()
