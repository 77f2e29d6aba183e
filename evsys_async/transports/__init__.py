"""Transports: the event stream out of the process (sinks) and back in (sources).

Transports know only events and their codec. A sink is a ``def`` bus handler
of envelopes with ``flush()`` (one write per delivered batch) and ``close()``;
:func:`attach` subscribes one. Sources read envelopes and publish their events
onto a local bus, from their own thread (``publish`` is thread-safe).
Redis Streams (extra ``redis``): docs/distributed.md.
"""

from __future__ import annotations

from .base import EnvelopeSink, attach
from .jsonl import JsonlSink, read_jsonl
from .redis import (
    RedisCoordinator,
    RedisSinkStats,
    RedisSourceStats,
    RedisStreamSink,
    RedisStreamSource,
    RedisUnavailableError,
    ResumePoint,
)

__all__ = [
    "EnvelopeSink",
    "JsonlSink",
    "RedisCoordinator",
    "RedisSinkStats",
    "RedisSourceStats",
    "RedisStreamSink",
    "RedisStreamSource",
    "RedisUnavailableError",
    "ResumePoint",
    "attach",
    "read_jsonl",
]
