"""Redis Streams: a run's events out to other processes and hosts, and ranks that agree.

* :class:`RedisStreamSink` — the event stream into ``evsys:<run_key>:events``,
  from its own sender thread, outage-safe (``redis_sink.py``);
* :class:`RedisStreamSource` — back onto a local bus, at least once, through a
  consumer group (``redis_source.py``);
* :class:`RedisCoordinator` — ranks that stop at the same step, and notice a
  dead rank (``redis_coordinator.py``).

All three use redis-py's blocking client in threads of their own
(``redis.asyncio`` does not run on trio), so they work on asyncio and trio.
The streams, and what at-least-once means here: docs/distributed.md.
"""

from __future__ import annotations

from ._redis import (
    DEFAULT_URL,
    RedisUnavailableError,
    control_stream,
    dead_stream,
    events_stream,
)
from .redis_coordinator import RedisCoordinator
from .redis_sink import RedisSinkStats, RedisStreamSink
from .redis_source import RedisSourceStats, RedisStreamSource, ResumePoint

__all__ = [
    "DEFAULT_URL",
    "RedisCoordinator",
    "RedisSinkStats",
    "RedisSourceStats",
    "RedisStreamSink",
    "RedisStreamSource",
    "RedisUnavailableError",
    "ResumePoint",
    "control_stream",
    "dead_stream",
    "events_stream",
]
