"""What the Lightning and Hugging Face bridges share: bad options fail when the
callback is made (a typo, an unknown kind), not from deep inside the trainer's fit."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from evsys_async.errors import ConfigError
from tests.integrations.helpers import INSTALL

pytestmark = [
    # the frameworks' own, on import under this Python and torch
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

#: bridge module -> what it needs installed
BRIDGES = {"lightning": ("lightning",), "transformers": ("transformers", "accelerate")}


@pytest.mark.parametrize("bridge", sorted(BRIDGES))
def test_bad_options_fail_when_the_callback_is_made_not_inside_the_trainer(
    tmp_path: Path, bridge: str
) -> None:
    for module in ("torch", *BRIDGES[bridge]):
        pytest.importorskip(module, reason=f"needs {module}: {INSTALL}")
    make = importlib.import_module(f"evsys_async.integrations.{bridge}").EvsysCallback
    out = tmp_path / "runs"
    with pytest.raises(TypeError, match="outptu_dir"):
        make(["local_logger"], outptu_dir=out)
    with pytest.raises(ValueError, match="batch_delay must be a number of seconds"):
        make(["local_logger"], output_dir=out, batch_delay="x")
    with pytest.raises(ConfigError, match=r"callbacks\[0\].*no_such_logger"):
        make(["no_such_logger"], output_dir=out)
    assert not out.exists()  # nothing claimed, nothing started
