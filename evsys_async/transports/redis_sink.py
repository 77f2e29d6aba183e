"""RedisStreamSink: the event stream into Redis, without ever making the bus wait.

The sink is a bus handler of envelopes (``attach(bus, sink)``, or
:class:`~evsys_async.callbacks.SinkCallback` in a loop's callbacks). It
encodes each envelope in its subscriber's thread and, once per delivered
batch, ``flush`` hands the batch to the sink's own sender thread and returns.
The sender appends chunks of up to ``pipeline_size`` envelopes to
``evsys:<run_key>:events`` in one round trip each (through a small server-side
script, else pipelined), trimmed by an approximate ``MAXLEN``.

When Redis cannot be reached the sender keeps the envelopes in order: up to
``max_buffered`` in memory, the rest in a spill file (``spill_path``; by
default ``redis-spill.bin`` in the run's directory, taken from the run's
``TrainStarted``); it logs one WARNING per outage, retries with redis-py's
exponential backoff with jitter, and sends everything, oldest first, once
Redis answers again. Nothing accepted is dropped: what is still unsent when
the sink closes (``close_timeout``) stays in the spill file, and the next sink
given that path sends it first. A chunk that failed half-way is sent again
whole, so a stream may hold an envelope twice; consumers drop duplicates by
``(bus_id, seq)`` (docs/distributed.md).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any, ClassVar

import msgspec

from .._util.log import get_logger
from ..events import Envelope, TrainStarted, encode
from . import _redis
from ._spill import SpillFile

__all__ = ["RedisSinkStats", "RedisStreamSink"]

_log = get_logger()
_ids = itertools.count(1)

#: the spill file's name in the run directory
SPILL_NAME = "redis-spill.bin"


class RedisSinkStats(msgspec.Struct, frozen=True):
    """A sink's counters.

    ``accepted`` envelopes were handed to the sink; ``sent`` reached Redis
    (a chunk sent again after a failure counts again); ``buffered`` wait in
    memory and ``spilled`` in the spill file; ``spilled_total`` ever went to
    the file; ``outages`` counts the times Redis became unreachable,
    ``retries`` the failed attempts, ``batches`` the pipelines that
    succeeded; ``last_error`` is the latest failure (credentials scrubbed).
    """

    accepted: int
    sent: int
    buffered: int
    spilled: int
    spilled_total: int
    outages: int
    retries: int
    batches: int
    connected: bool
    last_error: str | None
    spill_path: str | None


class RedisStreamSink:
    """Appends every envelope to a Redis stream from its own sender thread.

    ``url`` may hold credentials (``redis://:password@host:6379/0``); logs and
    errors show it redacted. The stream is ``stream`` if given, else
    ``evsys:<run_key>:events`` with ``run_key`` the argument, else each
    event's own run key (so one sink on a shared bus gives each run its
    stream). ``maxlen`` trims the stream approximately (``None``: never).
    ``pipeline_size`` bounds the envelopes sent in one round trip; fewer wait up
    to ``linger`` seconds after the previous send for more to join them.
    ``backoff`` is ``(base, cap)`` in seconds for the retries. ``close``
    waits up to ``close_timeout`` for the sender to finish.

    ``__call__`` and ``flush`` never block on Redis and never raise because of
    it; ``close`` blocks at most ``close_timeout``.
    """

    #: ``__call__`` only encodes and ``flush`` only hands over: safe on the event loop
    nonblocking: ClassVar[bool] = True

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        """The parameters a run config's ``transports: [{kind: redis, params}]`` takes."""

        url: str = _redis.DEFAULT_URL
        run_key: str | None = None
        stream: str | None = None
        maxlen: Annotated[int, msgspec.Meta(ge=1)] | None = 1_000_000
        max_buffered: Annotated[int, msgspec.Meta(ge=1)] = 10_000
        spill_path: str | None = None
        pipeline_size: Annotated[int, msgspec.Meta(ge=1)] = 512
        linger: Annotated[float, msgspec.Meta(ge=0)] = 0.01
        close_timeout: Annotated[float, msgspec.Meta(ge=0)] = 10.0

    def __init__(
        self,
        url: str = _redis.DEFAULT_URL,
        run_key: str | None = None,
        *,
        stream: str | None = None,
        maxlen: int | None = 1_000_000,
        max_buffered: int = 10_000,
        spill_path: str | os.PathLike[str] | None = None,
        pipeline_size: int = 512,
        backoff: tuple[float, float] = (0.05, 2.0),
        linger: float = 0.01,
        close_timeout: float = 10.0,
        client: Any = None,
    ) -> None:
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"RedisStreamSink: maxlen must be >= 1 or None, got {maxlen}")
        if max_buffered < 1 or pipeline_size < 1:
            raise ValueError(
                "RedisStreamSink: max_buffered and pipeline_size must be >= 1, got "
                f"max_buffered={max_buffered}, pipeline_size={pipeline_size}"
            )
        base, cap = backoff
        if not 0 < base <= cap:
            raise ValueError(
                f"RedisStreamSink: backoff must be (base, cap) with 0 < base <= cap, got {backoff}"
            )
        if close_timeout < 0 or linger < 0:
            raise ValueError(
                "RedisStreamSink: close_timeout and linger must be >= 0, got "
                f"close_timeout={close_timeout}, linger={linger}"
            )
        self.url = url
        self.run_key = run_key
        self.stream = stream
        self.maxlen = maxlen
        self.max_buffered = max_buffered
        self.pipeline_size = pipeline_size
        self.backoff = (float(base), float(cap))
        self.close_timeout = close_timeout
        self.linger = linger
        self.name = f"RedisStreamSink#{next(_ids)}"
        self._client = client if client is not None else _redis.client(url)
        self._streams: dict[str, str] = {}
        self._last_key = run_key or ""
        self._batch: list[tuple[str, bytes]] = []  # the subscriber thread's own
        self._accepted = 0
        # handed over to the sender; guarded by _cond
        self._cond = threading.Condition()
        self._handoff: list[tuple[str, bytes]] = []
        self._closing = False
        self._idle = False
        self._close_deadline = 0.0
        self._thread: threading.Thread | None = None
        # the sender thread's own (read elsewhere only for stats)
        self._memory: list[tuple[str, bytes]] = []
        self._explicit_spill = Path(spill_path) if spill_path is not None else None
        self._run_dir: Path | None = None
        self._spill: SpillFile | None = None
        self._sent = 0
        self._batches = 0
        self._outages = 0
        self._retries = 0
        self._down_since: float | None = None
        self._last_error: str | None = None
        #: the SHA1 of the server-side script that adds a chunk (None: one XADD per entry)
        self._sha: str | None = _redis.sha1(_redis.XADD_ALL)

    # -- the subscriber's thread ---------------------------------------------------

    def __call__(self, envelope: Envelope) -> None:
        event = envelope.event
        if type(event) is TrainStarted and event.output_dir and self._run_dir is None:
            self._run_dir = Path(event.output_dir)  # where a spill file goes by default
        self._batch.append((self._stream_for(event.run_key), encode(envelope)))

    def _stream_for(self, run_key: str) -> str:
        if self.stream is not None:
            return self.stream
        key = self.run_key or run_key or self._last_key
        self._last_key = key
        name = self._streams.get(key)
        if name is None:
            name = self._streams[key] = _redis.events_stream(key)
        return name

    def flush(self) -> None:
        """Hand the batch to the sender thread and return (never waits for Redis)."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        self._accepted += len(batch)
        with self._cond:
            self._handoff.extend(batch)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"evsys-redis-sink:{self.name}", daemon=True
                )
                self._thread.start()
            if self._idle or len(self._handoff) >= self.pipeline_size:
                self._cond.notify()  # else the sender wakes on its own timer (`linger`)

    def close(self) -> None:
        """Send what is left (waiting up to ``close_timeout``), then release the
        connections. The sink may be used again afterwards (the next run's events).

        What Redis did not take by then stays in the spill file, named in a
        WARNING; a sink given that ``spill_path`` (or a resumed run in the same
        directory) sends it first.
        """
        self.flush()
        thread = self._thread
        if thread is not None:
            with self._cond:
                self._closing = True
                self._close_deadline = time.monotonic() + self.close_timeout
                self._cond.notify()
            thread.join(self.close_timeout + 5.0)
            with self._cond:  # a closed sink may be used again (one sink, several runs)
                self._thread, self._closing = None, False
        self._client.connection_pool.disconnect()

    # -- counters ------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Envelopes accepted and not sent yet (in memory or spilled)."""
        spilled = len(self._spill) if self._spill is not None else 0
        return len(self._batch) + len(self._handoff) + len(self._memory) + spilled

    def stats(self) -> RedisSinkStats:
        """The sink's counters now (safe from any thread)."""
        spill = self._spill
        return RedisSinkStats(
            accepted=self._accepted,
            sent=self._sent,
            buffered=len(self._handoff) + len(self._memory),
            spilled=len(spill) if spill is not None else 0,
            spilled_total=spill.appended if spill is not None else 0,
            outages=self._outages,
            retries=self._retries,
            batches=self._batches,
            connected=self._down_since is None,
            last_error=self._last_error,
            spill_path=str(spill.path) if spill is not None else None,
        )

    def wait_sent(self, timeout: float | None = None) -> bool:
        """Block until everything handed over so far was sent; False on the timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._handoff or self._memory or (self._spill and len(self._spill)):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- the sender thread ---------------------------------------------------------

    def _spill_file(self) -> SpillFile:
        if self._spill is None:
            path = self._explicit_spill
            if path is None and self._run_dir is not None:
                path = self._run_dir / SPILL_NAME
            if path is None:
                fd, name = tempfile.mkstemp(prefix="evsys-redis-spill-", suffix=".bin")
                os.close(fd)
                path = Path(name)
            self._spill = SpillFile(path)
            self._spill.open_existing()  # leftovers of an earlier sink stay in front
        return self._spill

    def _take_up_leftovers(self) -> None:
        """A spill file an earlier sink left (Redis was down when it closed) holds older
        envelopes: they go first."""
        if self._spill is not None:
            return
        path = self._explicit_spill
        if path is None and self._run_dir is not None:
            path = self._run_dir / SPILL_NAME
        if path is None or not path.is_file() or path.stat().st_size == 0:
            return
        left = len(self._spill_file())
        if left:
            _log.info(
                "sending the envelopes an earlier sink left unsent", count=left, spill=str(path)
            )

    def _backlog(self) -> int:
        return len(self._memory) + (len(self._spill) if self._spill is not None else 0)

    def _run(self) -> None:
        from redis.backoff import ExponentialWithJitterBackoff

        base, cap = self.backoff
        backoff = ExponentialWithJitterBackoff(cap=cap, base=base)
        self._take_up_leftovers()
        failures, next_try, last_send = 0, 0.0, 0.0
        linger, size = self.linger, self.pipeline_size
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    queued = len(self._handoff) + self._backlog()
                    closing, deadline = self._closing, self._close_deadline
                    if closing and (not queued or now >= deadline):
                        break
                    if not queued:
                        self._idle = True  # the next flush wakes this thread
                        self._cond.wait(max(0.0, deadline - now) if closing else None)
                        self._idle = False
                        continue
                    # a full chunk (or the close) goes at once; less waits for more, up to
                    # `linger` after the previous send: fewer round trips, each of which costs
                    # the loop's thread a GIL hand-over
                    full = queued >= size or closing
                    send_at = next_try if full else max(next_try, last_send + linger)
                    if now >= send_at:
                        break
                    if self._handoff and self._down_since is not None:
                        break  # during an outage, take them in now: memory stays bounded
                    self._cond.wait(send_at - now)
                incoming, self._handoff = self._handoff, []
            self._take(incoming)
            if self._backlog() and time.monotonic() >= next_try:
                if self._send_chunk():
                    failures, last_send = 0, time.monotonic()
                    with self._cond:
                        self._cond.notify_all()  # wait_sent()
                else:
                    failures += 1
                    next_try = time.monotonic() + backoff.compute(failures)
            if closing and (not self._backlog() or time.monotonic() >= deadline):
                with self._cond:
                    if self._handoff:
                        continue
                self._leave_behind()
                return

    def _take(self, incoming: list[tuple[str, bytes]]) -> None:
        """New envelopes go behind the spilled ones (order), else into memory up to the bound."""
        if not incoming:
            return
        if self._spill is not None and len(self._spill):
            self._spill.append(incoming)
            return
        memory = self._memory
        memory.extend(incoming)
        if len(memory) > self.max_buffered:
            self._spill_file().append(memory[self.max_buffered :])
            del memory[self.max_buffered :]

    def _send_chunk(self) -> bool:
        """One pipeline of the oldest envelopes; False (and one WARNING) if Redis refused."""
        offset = 0
        if self._memory:
            chunk = self._memory[: self.pipeline_size]
        else:
            assert self._spill is not None
            chunk, offset = self._spill.peek(self.pipeline_size)
        try:
            self._write(chunk)
        except Exception as exc:  # any failure: keep the chunk and try again later
            self._failed(exc)
            return False
        if self._memory:
            del self._memory[: len(chunk)]
        else:
            assert self._spill is not None
            self._spill.consume(len(chunk), offset)
        self._sent += len(chunk)
        self._batches += 1
        if self._down_since is not None:
            _log.info(
                "Redis reachable again; sending the envelopes kept during the outage",
                sink=self.name,
                url=_redis.shown(self.url),
                outage_seconds=round(time.monotonic() - self._down_since, 3),
                left=self._backlog(),
            )
            self._down_since = None
        return True

    def _write(self, chunk: list[tuple[str, bytes]]) -> None:
        """Append every entry of ``chunk``, in order, in one round trip.

        Each run of entries for one stream goes as one call of a server-side
        script that adds them in order: one command and one reply per stream
        instead of one per entry. Where scripts are not allowed (an ACL, a
        managed Redis), one ``XADD`` per entry does the same. The commands leave
        in one buffer: each socket write this thread makes must take the GIL
        back from the loop's thread, so one write a chunk, not dozens, keeps the
        loop's pace (docs/performance.md).
        """
        redis = _redis.redis_module()
        commands = self._commands(chunk)
        try:
            self._round_trip(commands)
        except redis.exceptions.NoScriptError:  # a restarted Redis forgot the script
            self._client.script_load(_redis.XADD_ALL)
            self._round_trip(commands)
        except redis.ResponseError as exc:
            if self._sha is None or not _redis.script_refused(exc):
                raise
            _log.info(
                "Redis refuses scripts; the sink sends one XADD per entry instead",
                sink=self.name,
                error=_redis.describe_error(exc, self.url),
            )
            self._sha = None
            self._round_trip(self._commands(chunk))

    def _commands(self, chunk: list[tuple[str, bytes]]) -> list[tuple[Any, ...]]:
        maxlen = self.maxlen
        trim: tuple[Any, ...] = () if maxlen is None else ("MAXLEN", "~", maxlen)
        if self._sha is None:
            return [("XADD", stream, *trim, "*", "envelope", data) for stream, data in chunk]
        commands: list[tuple[Any, ...]] = []
        start = 0
        while start < len(chunk):
            stream = chunk[start][0]
            end = start + 1
            while end < len(chunk) and chunk[end][0] == stream:
                end += 1
            datas = [data for _, data in chunk[start:end]]
            commands.append(
                ("EVALSHA", self._sha, 1, stream, "" if maxlen is None else maxlen, *datas)
            )
            start = end
        return commands

    def _round_trip(self, commands: list[tuple[Any, ...]]) -> None:
        """Send ``commands`` in one buffer, read every reply; raise the first error."""
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([b"".join(conn.pack_commands(commands))])
            error: BaseException | None = None
            for _ in commands:
                try:
                    conn.read_response()
                except _redis.redis_module().ResponseError as exc:
                    error = error or exc  # read the rest: the connection stays in step
            if error is not None:
                raise error
        except BaseException as exc:
            if not isinstance(exc, _redis.redis_module().ResponseError):
                conn.disconnect()  # a reply may be left half read
            raise
        finally:
            pool.release(conn)

    def _failed(self, exc: BaseException) -> None:
        self._retries += 1
        self._last_error = _redis.describe_error(exc, self.url)
        if self._down_since is not None:
            return  # one WARNING per outage
        self._down_since = time.monotonic()
        self._outages += 1
        _log.warning(
            "Redis unreachable; the sink keeps the events and sends them when it is back "
            "(the loop does not wait)",
            sink=self.name,
            url=_redis.shown(self.url),
            error=self._last_error,
            max_buffered=self.max_buffered,
            spill=str(self._spill_file().path),
        )

    def _leave_behind(self) -> None:
        """At close: what was not sent goes to the spill file, named in a WARNING."""
        left = self._backlog()
        if not left:
            if self._spill is not None:
                self._spill.close()
            return
        spill = self._spill_file()
        # memory holds the oldest envelopes: they go in front of the spilled ones
        older, self._memory = self._memory, []
        spill.compact(older)
        spill.close(remove_if_empty=False)
        _log.warning(
            "Redis did not take every envelope before the sink closed; they are kept in the "
            "spill file, and a RedisStreamSink given spill_path= that file sends them first",
            sink=self.name,
            url=_redis.shown(self.url),
            unsent=left,
            spill=str(spill.path),
            error=self._last_error,
        )
