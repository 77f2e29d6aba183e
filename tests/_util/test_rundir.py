"""``_util/rundir.py``: run keys are names; run dirs and loggers' dirs are claimed (key,
key-1, ...; overwrite; resume); a bad output dir is one line naming it, never a pathlib
traceback; a relative logger path is inside the run dir."""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import evsys_async as ev
from evsys_async._util.rundir import (
    CLAIMS_FILE,
    check_run_key,
    claim_logger_dir,
    claim_run_dir,
    logger_path,
    read_claim,
    record_claim,
)


@pytest.mark.parametrize("key", ["demo", "lr-0.1", "arm_a-r0", "é-essai", "训练", "a" * 200])
def test_names_are_run_keys(tmp_path: Path, key: str) -> None:
    check_run_key(key, tmp_path)
    assert claim_run_dir(tmp_path, key) == (key, tmp_path / key)


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("../x", "would put the run's files outside output_dir"),
        ("a//b", "would put the run's files outside output_dir"),
        ("a/../../b", "would put the run's files outside output_dir"),
        ("..", "would put the run's files outside output_dir"),
        ("", "would put the run's files outside output_dir"),
        ("x\ny", r"holds characters a run key cannot have \('\\n'\)"),
        ("\u202eevil", r"holds characters a run key cannot have \('\\u202e'\)"),
        (" padded", r"\(a leading or trailing space\); a run key is printable text"),
        ("a" * 300, "is 300 bytes long in UTF-8; a run key is at most 200"),
        ("é" * 101, "is 202 bytes long in UTF-8"),
    ],
)
def test_other_keys_are_config_errors_that_say_what_would_do(
    tmp_path: Path, key: str, words: str
) -> None:
    with pytest.raises(ev.ConfigError, match=words):
        claim_run_dir(tmp_path, key)
    assert list(tmp_path.iterdir()) == []


def test_a_taken_key_takes_the_next_free_one_and_overwrite_and_resume_reuse_it(
    tmp_path: Path,
) -> None:
    assert claim_run_dir(tmp_path, "r") == ("r", tmp_path / "r")
    (tmp_path / "r" / "old.txt").write_text("x")
    assert claim_run_dir(tmp_path, "r")[0] == "r-1"
    assert claim_run_dir(tmp_path, "r", resume=True) == ("r", tmp_path / "r")
    assert (tmp_path / "r" / "old.txt").exists()
    assert claim_run_dir(tmp_path, "r", overwrite=True) == ("r", tmp_path / "r")
    assert list((tmp_path / "r").iterdir()) == []


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for where in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ev.ConfigError, match="is a file, or lies under one") as info:
            claim_run_dir(where, "r")
        assert str(where) in str(info.value) and "give a writable directory" in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A read-only tmpfs mounted for the test (mount(2): no process), or a skip."""
    where = tmp_path / "ro"
    where.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", os.fsencode(where), b"tmpfs", 1, b"size=64k") != 0:  # MS_RDONLY
        pytest.skip(f"cannot mount a tmpfs here: {os.strerror(ctypes.get_errno())}")
    try:
        yield where
    finally:
        libc.umount2(os.fsencode(where), 2)


def test_an_output_dir_on_a_read_only_file_system_is_one_line(read_only: Path) -> None:
    with pytest.raises(ev.ConfigError, match=r"is not writable \(OSError: \[Errno 30\]"):
        claim_run_dir(read_only / "runs", "r")
    with pytest.raises(ev.ConfigError, match=r"tensorboard_logger log_dir .* is not writable"):
        claim_logger_dir(
            read_only, "r", read_only.parent / "run", what="tensorboard_logger log_dir"
        )


def test_the_loop_says_it_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")

    async def step(state: ev.LoopState, i: int) -> dict[str, float]:
        return {}

    loop = ev.TrainingLoop(step, num_steps=1, output_dir=tmp_path / "file", run_key="r")
    with pytest.raises(ev.ConfigError, match=r"output_dir .* is a file"):
        loop.run_sync()
    loop = ev.TrainingLoop(step, num_steps=1, output_dir=tmp_path, run_key="x" * 300)
    with pytest.raises(ev.ConfigError, match="at most 200"):
        loop.run_sync()


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path: Path) -> None:
    import io

    from evsys_async.cli import run_cli

    (tmp_path / "file").write_text("x")
    demo = Path(__file__).parents[2] / "examples" / "demo.yaml"
    out, err = io.StringIO(), io.StringIO()
    code = run_cli(["run", str(demo), "--output-dir", str(tmp_path / "file")], out=out, err=err)
    assert code == 2
    assert err.getvalue() == (
        f"evsys-async: bad config: output_dir '{tmp_path / 'file'}' is a file, or lies under one, "
        "not a directory; give a writable directory (--output-dir / output_dir=)\n"
    )


def test_a_logger_dir_is_claimed_recorded_and_found_again(tmp_path: Path) -> None:
    root, run_a, run_b = tmp_path / "tb", tmp_path / "a" / "r", tmp_path / "b" / "r"
    assert claim_logger_dir(root, "r", run_a) == root / "r"
    assert claim_logger_dir(root, "r", run_b) == root / "r-1"  # another run: never shared
    assert json.loads((run_b / CLAIMS_FILE).read_text()) == {str(root): str(root / "r-1")}
    assert claim_logger_dir(root, "r", run_b, resume=True) == root / "r-1"
    (root / "r" / "events").write_text("x")
    assert claim_logger_dir(root, "r", run_b, overwrite=True) == root / "r"
    assert list((root / "r").iterdir()) == []
    record_claim(run_b, "mlflow sqlite:///x", "abc")
    assert read_claim(run_b, "mlflow sqlite:///x") == "abc"
    assert read_claim(run_b, str(root)) == str(root / "r")
    assert read_claim(tmp_path / "nowhere", "x") is None


def test_a_relative_logger_path_is_inside_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "runs" / "r"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EVSYS_SUB", "logs")
    assert logger_path("tb", run_dir, what="log_dir") == run_dir / "tb"
    assert logger_path("$EVSYS_SUB/tb", run_dir, what="log_dir") == run_dir / "logs" / "tb"
    assert logger_path("a/../b", run_dir, what="log_dir") == run_dir / "a" / ".." / "b"
    assert logger_path("~/tb", run_dir, what="log_dir") == tmp_path / "home" / "tb"
    assert logger_path(tmp_path / "abs", run_dir, what="log_dir") == tmp_path / "abs"
    with pytest.raises(ev.ConfigError, match=r"out_path '\.\./\.\./x\.csv' leads out of the run"):
        logger_path("../../x.csv", run_dir, what="out_path")
    with pytest.raises(ev.ConfigError, match=r"\$EVSYS_NOT_SET"):
        logger_path("$EVSYS_NOT_SET/x", run_dir, what="out_path")


@pytest.mark.parametrize("key", ["lr=0.1", "has space", "sweep/arm-a", "Łódź_2", "a.b"])
def test_printable_names_and_nested_names_are_run_keys(tmp_path: Path, key: str) -> None:
    from evsys_async._util.rundir import claim_run_dir

    claimed, run_dir = claim_run_dir(tmp_path, key)
    assert (claimed, run_dir) == (key, tmp_path / key)
    assert run_dir.is_dir()
