"""``expand_path``: ``~`` and ``$VAR`` in every user path; an unset variable is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from evsys_async._util.paths import expand_path
from evsys_async.errors import ConfigError


def test_home_and_variables_expand(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EVSYS_TEST_DIR", "logs")
    assert expand_path("~/tb") == tmp_path / "tb"
    assert expand_path("$EVSYS_TEST_DIR/x") == Path("logs/x")
    assert expand_path("${EVSYS_TEST_DIR}/y") == Path("logs/y")
    assert expand_path(Path("plain/rel")) == Path("plain/rel")


def test_an_unset_variable_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVSYS_NOT_SET", raising=False)
    with pytest.raises(ConfigError, match=r"log_dir '\$EVSYS_NOT_SET/tb'.*EVSYS_NOT_SET"):
        expand_path("$EVSYS_NOT_SET/tb", what="log_dir")
