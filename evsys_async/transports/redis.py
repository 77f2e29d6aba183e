"""Redis Streams: ship the event stream to subscribers in other processes and machines.

Each envelope is one stream entry ``{"envelope": <JSON>}``. The sink runs in
its subscriber's own thread with redis-py's blocking client, and the source
reads in its own daemon thread and publishes through the thread-safe
``bus.publish`` — so both work on asyncio and on trio.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel

from .._log import get_logger
from ..errors import import_extra
from ..events import Envelope, Event, decode_envelope, encode

__all__ = ["RedisStreamSink", "RedisStreamSource"]

_log = get_logger()
DEFAULT_URL = "redis://127.0.0.1:6379/0"


def _client(url: str) -> Any:
    return import_extra("redis", "redis", "the Redis transport").Redis.from_url(url)


class RedisStreamSink:
    """Appends every envelope to the stream ``stream`` (``XADD``), pipelined per batch.

    ``maxlen`` caps the stream (approximately, as Redis trims whole nodes);
    ``None`` keeps everything. A failed write (Redis down) raises into the bus
    — logged, counted as failed, ``CallbackFailed`` published — and keeps the
    batch for the next flush: nothing accepted is dropped.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        stream: str = "evsys:events",
        maxlen: int | None = 1_000_000,
        client: Any = None,
    ) -> None:
        self.stream = stream
        self.maxlen = maxlen
        self._client = client if client is not None else _client(url)
        self._buffer: list[bytes] = []

    def __call__(self, envelope: Envelope) -> None:
        self._buffer.append(encode(envelope))

    def flush(self) -> None:
        if not self._buffer:
            return
        pipe = self._client.pipeline(transaction=False)
        for data in self._buffer:
            if self.maxlen is None:
                pipe.xadd(self.stream, {"envelope": data})
            else:
                pipe.xadd(self.stream, {"envelope": data}, maxlen=self.maxlen, approximate=True)
        pipe.execute()
        self._buffer.clear()

    @property
    def pending(self) -> int:
        """Envelopes accepted but not yet written (kept across failed flushes)."""
        return len(self._buffer)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._client.close()


class RedisStreamSource:
    """Reads envelopes from a stream, from ``start`` on (``"$"``: only new ones).

    :meth:`forward` publishes each event onto a local bus. Envelopes from the
    local bus itself (same ``bus_id``) and ones seen before (a ``seq`` not
    above the last one of its ``bus_id``) are skipped, so a sink and a source
    on the same stream do not echo.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        stream: str = "evsys:events",
        start: str = "$",
        block_ms: int = 100,
        client: Any = None,
    ) -> None:
        self.stream = stream
        self.last_id = start
        self.block_ms = block_ms
        self._client = client if client is not None else _client(url)
        self._seen: dict[str, int] = {}

    def read(self, count: int = 512) -> list[Envelope]:
        """Block up to ``block_ms`` for new entries; return their envelopes in order.

        A malformed entry is logged and skipped (it names the entry id).
        """
        reply = self._client.xread({self.stream: self.last_id}, count=count, block=self.block_ms)
        out: list[Envelope] = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self.last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                data = fields.get(b"envelope") or fields.get("envelope")
                try:
                    out.append(decode_envelope(data))
                except Exception as exc:
                    _log.warning(
                        "malformed stream entry skipped",
                        stream=self.stream,
                        entry=self.last_id,
                        error=str(exc),
                    )
        return out

    def _fresh(self, envelope: Envelope, local_bus_id: str) -> bool:
        if envelope.bus_id == local_bus_id:
            return False
        last = self._seen.get(envelope.bus_id, -1)
        if envelope.seq <= last:
            return False
        self._seen[envelope.bus_id] = envelope.seq
        return True

    async def forward(
        self,
        bus: Any,
        *,
        until: Callable[[Event], bool] | None = None,
    ) -> int:
        """Publish every new event from the stream onto ``bus`` until cancelled, or
        until ``until(event)`` is true for a forwarded event. Returns the count.

        Reading happens in a daemon thread; cancelling this call stops it within
        ``block_ms``.
        """
        stop = threading.Event()
        done = anyio.Event()
        token = anyio.lowlevel.current_token()
        count = 0
        error: list[BaseException] = []

        def run() -> None:
            nonlocal count
            try:
                while not stop.is_set():
                    for envelope in self.read():
                        if not self._fresh(envelope, bus.bus_id):
                            continue
                        bus.publish(envelope.event)
                        count += 1
                        if until is not None and until(envelope.event):
                            stop.set()
                            break
            except BaseException as exc:
                error.append(exc)
            finally:
                with contextlib.suppress(RuntimeError):  # the event loop is gone
                    anyio.from_thread.run_sync(done.set, token=token)

        threading.Thread(target=run, name=f"evsys-redis-source:{self.stream}", daemon=True).start()
        try:
            await done.wait()
        finally:
            stop.set()
        if error:
            raise error[0]
        return count

    def close(self) -> None:
        self._client.close()
