"""The suite's rules: backends, the ``slow`` mark, and a temp dir of its own.

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

The temp dir: for the session, ``TMPDIR`` (inherited by every subprocess) and
:data:`tempfile.tempdir` point at a fresh directory of the session's own; once
the tests are done it must be empty. Whatever is left there is named, with the
test after which it first appeared, and fails the run (exit status 1); the
directory is removed either way. pytest's own ``tmp_path`` directories and this
process's multiprocessing directory (removed at exit by multiprocessing) stay
where they always are. A directory of its own, not a diff of ``/tmp``: other
programs on the machine may use ``/tmp`` meanwhile.
"""

from __future__ import annotations

import logging
import multiprocessing.process
import multiprocessing.util
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
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


# -- a temp dir of the session's own -----------------------------------------------------------

_TEMP_DIR = pytest.StashKey[Path]()
_FIRST_SEEN = pytest.StashKey[dict[str, str]]()
_LEFT = pytest.StashKey[list[str]]()


@pytest.fixture(scope="session", autouse=True)
def _own_temp_dir(
    pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    tmp_path_factory.getbasetemp()  # pytest keeps its tmp_path dirs where it always does
    multiprocessing.util.get_temp_dir()  # removed by multiprocessing when pytest exits
    own = Path(tempfile.mkdtemp(prefix="evsys-tests-"))
    pytestconfig.stash[_TEMP_DIR] = own
    pytestconfig.stash[_FIRST_SEEN] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(own))
        patch.setattr(tempfile, "tempdir", str(own))
        yield own


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    """Note the test after which each entry of the temp dir first appeared."""
    try:
        return (yield)
    finally:  # a teardown that fails too
        own = item.config.stash.get(_TEMP_DIR, None)
        if own is not None and own.is_dir():
            seen = item.config.stash[_FIRST_SEEN]
            for name in os.listdir(own):
                seen.setdefault(name, item.nodeid)


def _kept_until_exit(name: str) -> bool:
    """What a library keeps in the temp dir while the process lives and removes when it
    exits: ``import wandb`` makes two directories, and wandb's service one of its own."""
    return (name.startswith("tmp") and name.endswith(("wandb-media", "wandb-artifacts"))) or (
        name.startswith(f"wandb-{os.getpid()}-")
    )


@pytest.hookimpl(trylast=True)  # after the session's fixtures are torn down
def pytest_sessionfinish(session: pytest.Session) -> None:
    own = session.config.stash.get(_TEMP_DIR, None)
    if own is None or not own.is_dir():
        return
    seen = session.config.stash[_FIRST_SEEN]
    left = [
        f"{name} (first seen after {seen.get(name, 'the last test')})"
        for name in sorted(os.listdir(own))
        if not _kept_until_exit(name)
    ]
    shutil.rmtree(own, ignore_errors=True)
    if left:
        session.config.stash[_LEFT] = left
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    left = config.stash.get(_LEFT, [])
    if left:
        terminalreporter.section("left in the temp dir", sep="!", red=True)
        for line in left:
            terminalreporter.line(line, red=True)
        terminalreporter.line(
            "so the run fails: the tests must leave nothing in the temp dir; remove it in "
            "the test, or give the code a path under tmp_path (tests/conftest.py)",
            red=True,
        )
