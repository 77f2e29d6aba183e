"""Transports: the event stream out of the process (sinks) and back in (sources).

Transports know events, their codec and the bus they attach to, never a run. A
sink is a ``def`` bus handler of envelopes with ``flush()`` (one write per
delivered batch) and ``close()``; :func:`attach` subscribes one. Sources read
envelopes and publish their events onto a local bus, from their own thread
(``publish`` is thread-safe).
Redis Streams (extra ``redis``): docs/distributed.md. ``TorchDistributedCoordinator``
(extra ``torch``) keeps a ``torch.distributed`` job's ranks in step: docs/trainers.md.
"""

from __future__ import annotations

from .base import EnvelopeSink, attach
from .jsonl import EventLogReader, JsonlSink, LogHeader, SkippedLine, log_header, read_jsonl
from .redis import (
    RedisCoordinator,
    RedisSinkStats,
    RedisSourceStats,
    RedisStreamSink,
    RedisStreamSource,
    RedisUnavailableError,
    ResumePoint,
)
from .torch_coordinator import TorchDistributedCoordinator

__all__ = [
    "EnvelopeSink",
    "EventLogReader",
    "JsonlSink",
    "LogHeader",
    "RedisCoordinator",
    "RedisSinkStats",
    "RedisSourceStats",
    "RedisStreamSink",
    "RedisStreamSource",
    "RedisUnavailableError",
    "ResumePoint",
    "SkippedLine",
    "TorchDistributedCoordinator",
    "attach",
    "log_header",
    "read_jsonl",
]
