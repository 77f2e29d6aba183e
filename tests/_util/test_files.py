"""File writes (``_util/files.py``): atomic replacement, and async writes on both backends.

An atomic write leaves the old content or the new, never a mix, nothing
behind on failure, and a failure is raised or logged, never silent. The async
helper uses aiofiles on asyncio and anyio on trio.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import anyio
import pytest

from evsys_async._util.files import append_bytes, atomic_writer, open_async, write_atomic

pytestmark = pytest.mark.anyio


async def test_open_write_append_on_either_backend(tmp_path: Path, anyio_backend: str) -> None:
    path = tmp_path / "x.jsonl"
    with anyio.fail_after(10):
        f = await open_async(path, "w")
        try:
            await f.write('{"a": 1}\n')
            await f.flush()
        finally:
            await f.aclose()
        await append_bytes(path, b'{"a": 2}\n')
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"a": 2}\n'
    if anyio_backend == "asyncio":
        import aiofiles  # noqa: F401 - the asyncio path uses it

        f = await open_async(path, "rb")
        assert type(f).__name__ == "_AiofilesFile"
        await f.aclose()


# -- atomic writes ---------------------------------------------------------------------


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_atomic_replaces_the_content_and_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    assert write_atomic(path, '{"a": 1}\n') is True
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n'
    assert write_atomic(path, b'{"a": 2}') is True  # bytes as they are
    assert path.read_bytes() == b'{"a": 2}'
    assert write_atomic(path, "é") and path.read_bytes() == "é".encode()  # text as UTF-8
    assert _leftovers(tmp_path) == []


def test_the_new_file_gets_the_permissions_a_plain_open_gives(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic = tmp_path / "atomic.txt"
    write_atomic(atomic, "x")
    assert os.stat(atomic).st_mode == os.stat(plain).st_mode


def test_a_failed_block_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("old\n")
    seen_meanwhile: list[str] = []

    def write_then_fail() -> None:
        with atomic_writer(path) as f:
            f.write("new, partly")
            seen_meanwhile.append(path.read_text())
            raise RuntimeError("half way")

    with pytest.raises(RuntimeError, match="half way"):
        write_then_fail()
    assert seen_meanwhile == ["old\n"]  # a reader sees the old file meanwhile
    assert path.read_text() == "old\n"
    assert _leftovers(tmp_path) == []


def test_a_failed_replace_is_raised_and_cleaned_up(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError):
        write_atomic(target, "data", errors="raise")
    assert target.is_dir() and _leftovers(tmp_path) == []


def test_a_failure_is_logged_naming_the_file_or_raised_when_asked(
    tmp_path: Path, warnings_log: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "missing-dir" / "manifest.json"
    with pytest.raises(FileNotFoundError):
        write_atomic(path, "{}", errors="raise")
    assert warnings_log.records == []  # raised, so not logged as well
    assert write_atomic(path, "{}") is False  # the default: logged, never raised
    [record] = warnings_log.records
    message = record.getMessage()
    assert message.startswith("could not write file") and str(path) in message
    assert "FileNotFoundError" in message


def test_writers_in_many_threads_each_replace_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "shared.json"
    start = threading.Barrier(6)
    contents = [f"{i}" * 10_000 for i in range(6)]
    errors: list[BaseException] = []

    def write(text: str) -> None:
        start.wait()
        try:
            for _ in range(20):
                write_atomic(path, text)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert path.read_text() in contents  # one writer's content, whole
    assert _leftovers(tmp_path) == []
