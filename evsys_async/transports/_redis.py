"""What the Redis sink, source and coordinator share: clients, stream names, outages.

Every run has three streams, named after its run key:

* ``evsys:<run_key>:events`` — one entry per event, ``{"envelope": <JSON>}``;
* ``evsys:<run_key>:dead`` — entries of the events stream that did not decode,
  copied there by consumer groups with the reason;
* ``evsys:<run_key>:control`` — the ranks' heartbeats and stop agreement.

Clients are redis-py's blocking ones, used from threads of our own
(``redis.asyncio`` does not run on trio). A URL is shown only through
:func:`~evsys_async._util.secrets.redact_url`, and a redis-py error only after
:func:`describe_error` scrubbed the URL's credentials from it.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .._util.secrets import redact_url, scrub, secrets_of
from ..errors import EvsysError, import_extra

__all__ = [
    "DEFAULT_URL",
    "READ_GROUP",
    "XADD_ALL",
    "RedisUnavailableError",
    "client",
    "control_stream",
    "dead_stream",
    "describe_error",
    "events_stream",
    "outage_errors",
    "redis_module",
    "script_refused",
    "sha1",
    "shown",
    "stream_name",
]

DEFAULT_URL = "redis://127.0.0.1:6379/0"


class RedisUnavailableError(EvsysError, ConnectionError):
    """Redis could not be reached where it had to be (a consumer starting); the message
    names the URL (redacted) and the cause."""

    @classmethod
    def wrap(cls, exc: BaseException, url: str, doing: str) -> RedisUnavailableError:
        return cls(
            f"cannot reach Redis at {shown(url)} to {doing}: {describe_error(exc, url)}; "
            "is the server running and the URL right?"
        )


def stream_name(run_key: str, kind: str) -> str:
    """``evsys:<run_key>:<kind>``; an empty key stands for ``run`` (the loop's default)."""
    return f"evsys:{run_key or 'run'}:{kind}"


def events_stream(run_key: str) -> str:
    return stream_name(run_key, "events")


def dead_stream(run_key: str) -> str:
    return stream_name(run_key, "dead")


def control_stream(run_key: str) -> str:
    return stream_name(run_key, "control")


def redis_module() -> Any:
    """redis-py, or a :class:`MissingExtraError` naming ``pip install 'evsys-async[redis]'``."""
    return import_extra("redis", "redis", "the Redis transport")


def client(url: str, *, retries: int = 0, timeout: float = 5.0) -> Any:
    """A blocking redis-py client for ``url``.

    ``retries`` = 0 makes each command fail fast when Redis is away, so the
    caller decides when to try again (the sink keeps spilling meanwhile);
    ``retries`` > 0 retries a command with redis-py's exponential backoff with
    jitter, for the short blips a reader can wait through. ``timeout`` bounds
    connecting and each reply (a blocking read adds its own block time).
    """
    redis = redis_module()
    from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
    from redis.retry import Retry

    backoff = ExponentialWithJitterBackoff(cap=1.0, base=0.05) if retries else NoBackoff()
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(backoff, retries),
        health_check_interval=30,
    )


def outage_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "Redis is not reachable now" (try again later)."""
    redis = redis_module()
    return (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError, OSError)


def describe_error(exc: BaseException, url: str) -> str:
    """``Type: message`` of a redis-py error, with the URL's credentials scrubbed."""
    text = f"{type(exc).__name__}: {exc}"
    return scrub(text, secrets_of(url=url))


def shown(url: str) -> str:
    """The URL as logs and messages may show it."""
    return redact_url(url)


# -- server-side scripts ------------------------------------------------------------------
#
# Each turns one batch into one command and one flat reply, so the client's
# work per entry (packing commands, parsing nested replies in Python) moves to
# the server, which does it in C: the training process and the consumer keep
# their CPU for themselves (docs/performance.md). Where scripts are refused (an
# ACL, a managed Redis), plain commands do the same work.

#: XADD every envelope of ARGV[2..] to KEYS[1], in order (ARGV[1]: the MAXLEN or "")
XADD_ALL = """
local maxlen = ARGV[1]
for i = 2, #ARGV do
  if maxlen == '' then
    redis.call('XADD', KEYS[1], '*', 'envelope', ARGV[i])
  else
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'envelope', ARGV[i])
  end
end
return #ARGV - 1
"""

#: XREADGROUP (not blocking) of up to ARGV[3] new entries of KEYS[1] for group ARGV[1],
#: consumer ARGV[2]; returns {ids joined by spaces, envelopes joined by newlines}. An
#: entry without an envelope, or with a newline in it (no JSON envelope has one), or
#: trimmed away, is an empty string: the caller reads that entry as it is.
READ_GROUP = """
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                         'STREAMS', KEYS[1], '>')
if not reply then return {'', ''} end
local ids, bodies = {}, {}
for i, entry in ipairs(reply[1][2]) do
  ids[i] = entry[1]
  local fields, body = entry[2], ''
  if fields then
    for j = 1, #fields, 2 do
      if fields[j] == 'envelope' then body = fields[j + 1] end
    end
    if string.find(body, '\\n', 1, true) then body = '' end
  end
  bodies[i] = body
end
return {table.concat(ids, ' '), table.concat(bodies, '\\n')}
"""


def sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def script_refused(exc: BaseException) -> bool:
    """A ResponseError saying scripts may not run here (as opposed to a failed command)."""
    text = str(exc).lower()
    return "noperm" in text or "unknown command" in text or "scripts are disabled" in text
