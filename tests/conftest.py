"""Every async test runs on asyncio and on trio (anyio's pytest plugin)."""

from __future__ import annotations

import logging
import os

import pytest

#: where the Redis tests look; ``.ci/run`` starts a server there
REDIS_URL = os.environ.get("EVSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_REDIS = "redis-server --daemonize yes --port 6379 --save ''"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture WARNING records of the ``evsys_async`` logger."""
    caplog.set_level(logging.WARNING, logger="evsys_async")
    return caplog


@pytest.fixture
def redis_url() -> str:
    """The URL of a reachable Redis. Without one the test is skipped with the command
    that starts one; under CI (``CI`` set, as ``.ci/run`` runs) it fails instead, so a
    CI run never passes by skipping them."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        message = f"no Redis reachable at {REDIS_URL}; start one with: {START_REDIS}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (.ci/run starts it)")
        pytest.skip(message)
    finally:
        client.close()
    return REDIS_URL
