"""Where the trainers' libraries keep their caches: under the test's own temp dir.

torch's compiler cache (``torchinductor_<user>``, which the ``Trainer`` makes) would
otherwise land in the temp dir the suite must leave empty (tests/conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _caches_under_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torchinductor"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing here may download
