"""The suite's rules: backends and the ``slow`` mark.

Backends: every async test runs on asyncio and on trio (anyio's pytest plugin,
the ``anyio_backend`` fixture below).

``slow``: a test is slow when it starts a process (a subprocess, a callback's
child process, a redis-server), talks to Redis, serves HTTP on a socket, or runs
a hypothesis search that takes seconds. ``pytest -m "not slow"`` runs the rest
(under a minute); ``pytest`` runs everything. Where the mark comes from:

* a test that requests a fixture in :data:`SLOW_FIXTURES` (``redis_url``,
  ``wandb_env``) is marked here, in :func:`pytest_collection_modifyitems`;
* a module about one of these (the CLI in a subprocess, child processes, a
  served example, the Redis sink) marks all its tests in ``pytestmark``;
* any other slow test carries ``@pytest.mark.slow``.

A test that starts a process without the mark fails at its teardown, naming
what it started (:func:`_slow_rule`), so the fast part cannot quietly grow slow.
"""

from __future__ import annotations

import logging
import multiprocessing.process
import os
import shlex
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

#: where the Redis tests look; ``.ci/run`` starts a server there
REDIS_URL = os.environ.get("EVSYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
START_REDIS = "redis-server --daemonize yes --port 6379 --save ''"

#: a test that requests one of these fixtures is marked ``slow``: ``redis_url`` talks to
#: Redis; ``wandb_env`` runs the real wandb, which starts its service process
SLOW_FIXTURES = frozenset({"redis_url", "wandb_env"})


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


# -- the slow mark -----------------------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


#: the processes started since the current test's setup began
_started: list[str] = []


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _started.clear()  # before any fixture of the test is set up


@pytest.fixture(scope="session", autouse=True)
def _processes_noted() -> Iterator[None]:
    """Note every process started: a subprocess (asyncio's, trio's and anyio's go
    through :class:`subprocess.Popen` too) or a :mod:`multiprocessing` child."""
    popen_init = subprocess.Popen.__init__
    process_start = multiprocessing.process.BaseProcess.start

    def popen(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        shown = shlex.join(map(str, args)) if isinstance(args, list | tuple) else str(args)
        _started.append(f"the subprocess {shown[:120]!r}")
        popen_init(self, args, *rest, **kwargs)

    def start(self: multiprocessing.process.BaseProcess) -> None:
        _started.append(f"the child process {self.name!r}")
        process_start(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", popen)
        patch.setattr(multiprocessing.process.BaseProcess, "start", start)
        yield


@pytest.fixture(autouse=True)
def _slow_rule(request: pytest.FixtureRequest, _processes_noted: None) -> Iterator[None]:
    """Fail a test that started a process but is not marked ``slow``."""
    yield
    if _started and request.node.get_closest_marker("slow") is None:
        started = ", ".join(dict.fromkeys(_started))
        pytest.fail(
            f"{request.node.nodeid} started {started} but is not marked slow: give it "
            "@pytest.mark.slow (or its module pytestmark) so that `pytest -m 'not slow'` "
            "stays fast (tests/conftest.py says which tests are slow)",
            pytrace=False,
        )
