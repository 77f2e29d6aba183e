"""Credentials in URLs and headers are masked wherever they are shown."""

from __future__ import annotations

import logging

import pytest

from evsys_async._util.secrets import (
    ScrubFilter,
    is_secret_name,
    redact_config,
    redact_headers,
    redact_url,
    scrub,
    secrets_of,
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@host:8443/eval", "https://user:***@host:8443/eval"),
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("https://ghp_TOKEN@host/x", "https://***@host/x"),
        (
            "http://h/e?token=abc&n=1&API_KEY=k&sig=s",
            "http://h/e?token=***&n=1&API_KEY=***&sig=***",
        ),
        ("http://127.0.0.1:8000/eval?step=1", "http://127.0.0.1:8000/eval?step=1"),
        ("http://[::1", "***"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_secrets_of_and_scrub() -> None:
    found = secrets_of(
        url="https://me:p%40ss@h/e?access_token=t0ken&n=12",
        headers={"Authorization": "Bearer abc.def", "X-Api-Key": "k3y"},
    )
    assert {"p%40ss", "p@ss", "t0ken", "Bearer abc.def", "abc.def", "k3y"} <= set(found)
    assert "12" not in found and "me" not in found
    assert scrub("sent Bearer abc.def with p@ss", found) == "sent *** with ***"
    assert redact_headers({"Authorization": "Bearer abc.def"}) == {"Authorization": "***"}


def test_scrub_filter_rewrites_third_party_records(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_secrets.third_party")
    flt = ScrubFilter(["s3cret"])
    logger.addFilter(flt)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("GET %s", "http://u:s3cret@h/")
    finally:
        logger.removeFilter(flt)
    assert caplog.records[0].getMessage() == "GET http://u:***@h/"


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("api_key", True),
        ("hf_token", True),
        ("dbPassword", True),
        ("Authorization", True),
        ("X-Api-Key", True),
        ("accessKey", True),
        ("client_secret", True),
        ("run_key", False),  # names, not credentials
        ("monitor_key", False),
        ("keys", False),
        ("max_tokens", False),
        ("tokenizer", False),
        ("lr", False),
    ],
)
def test_is_secret_name(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_redact_config_masks_credentials_and_keeps_the_rest_plain() -> None:
    from pathlib import Path

    config = {
        "lr": 0.1,
        "api_key": "k",
        "auth": {"user": "me", "password": "pw"},
        "headers": {"X-Trace": "abc"},
        "db": "redis://:pw@h:6379/0",
        "tags": {"b", "a"},
        "where": Path("/data"),
        "run_key": "exp1",
        "steps": (1, 2),
    }
    assert redact_config(config) == {
        "lr": 0.1,
        "api_key": "***",
        "auth": {"user": "***", "password": "***"},
        "headers": {"X-Trace": "***"},
        "db": "redis://:***@h:6379/0",
        "tags": ["a", "b"],
        "where": "/data",
        "run_key": "exp1",
        "steps": [1, 2],
    }
    assert config["api_key"] == "k"  # the caller's value is untouched
