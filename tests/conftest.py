"""Every async test runs on asyncio and on trio (anyio's pytest plugin)."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def warnings_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture WARNING records of the ``evsys_async`` logger."""
    caplog.set_level(logging.WARNING, logger="evsys_async")
    return caplog
