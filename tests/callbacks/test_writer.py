"""Nothing is lost without a word: the built-in writers on a full disk, a read-only
directory, a vanished one, and a disk whose space comes back mid-run.

A small tmpfs is mounted for the test where it can be (root, Linux: through
``mount(2)``, no process started); elsewhere the writer's one write call is
replaced by one that refuses as a full disk does (``_writer.os_write``). Files
are read back with ``csv`` and pandas; every count is exact.
"""

from __future__ import annotations

import csv
import ctypes
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from evsys_async.callbacks import _writer
from evsys_async.callbacks._writer import RowWriter
from evsys_async.callbacks.csv_metrics import CsvMetricsCallback
from evsys_async.callbacks.local_logger import LocalLoggerCallback
from evsys_async.events import Event, StepEnded
from tests.callbacks.helpers import WAIT, drive, make_state, run_events

pytestmark = pytest.mark.anyio

MS_RDONLY, MS_REMOUNT, MNT_DETACH = 1, 32, 2


class SmallDisk:
    """A 512 KiB filesystem at ``root``: ``fill()`` leaves ``free`` bytes, ``release()``
    gives the space back, ``read_only()`` remounts it so."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.filler = root / ".filler"
        self.full, self.budget = False, 0
        self.mounted = _mount(root, "size=512k")
        self._ro = False
        if not self.mounted:  # no mount here: refuse in the writer's one write call
            real = _writer.os_write

            def refusing(fd: int, data: bytes) -> int:
                if self._ro:
                    raise OSError(errno.EROFS, "Read-only file system")
                if self.full:
                    if self.budget <= 0:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    data = bytes(data[: self.budget])  # a short write, as a disk filling up
                    self.budget -= len(data)
                return real(fd, data)

            monkeypatch.setattr(_writer, "os_write", refusing)

    def fill(self, free: int = 0) -> None:
        self.full, self.budget = True, free
        if not self.mounted:
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            with pytest.raises(OSError, match="No space left"):
                _write_until_full(fd)
        finally:
            os.close(fd)
        if free:
            size = self.filler.stat().st_size
            os.truncate(self.filler, max(0, size - free))

    def release(self) -> None:
        self.full = False
        if self.mounted:
            self.filler.unlink()

    def read_only(self) -> None:
        self._ro = True
        if self.mounted:
            libc = ctypes.CDLL(None, use_errno=True)
            flags = MS_REMOUNT | MS_RDONLY
            assert libc.mount(b"tmpfs", bytes(self.root), b"tmpfs", flags, None) == 0

    def close(self) -> None:
        if self.mounted:
            ctypes.CDLL(None, use_errno=True).umount2(bytes(self.root), MNT_DETACH)


def _write_until_full(fd: int) -> None:
    while os.write(fd, b"\0" * 4096):
        pass


def _mount(root: Path, options: str) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        return bool(libc.mount(b"tmpfs", bytes(root), b"tmpfs", 0, options.encode()) == 0)
    except AttributeError:  # no mount(2) here
        return False


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    root = tmp_path / "disk"
    root.mkdir()
    small = SmallDisk(root, monkeypatch)
    try:
        yield small
    finally:
        small.close()


def read_csv(path: Path) -> list[dict[str, str]]:
    """The file as csv reads it, every row whole and as wide as the header; pandas
    reads the same rows."""
    import pandas as pd

    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "the file ends in a torn row"
    rows = list(csv.reader(text.splitlines()))
    header, body = rows[0], rows[1:]
    assert all(len(r) == len(header) for r in body), "a torn or short row"
    frame = pd.read_csv(path)
    assert list(frame.columns) == header
    assert len(frame) == len(body)
    return [dict(zip(header, r, strict=True)) for r in body]


def jsonl_steps(path: Path) -> list[int]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "the file ends in a torn line"
    return [json.loads(line)["step"] for line in text.splitlines() if '"step"' in line]


def event_steps(path: Path) -> list[int]:
    """The steps of the ``StepEnded`` envelopes in an event log, every line whole."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "the file ends in a torn line"
    events = [json.loads(line).get("event", {}) for line in text.splitlines()]
    return [e["step"] for e in events if e.get("type") == "StepEnded"]


def many(n: int) -> list[Event]:
    return run_events(n, lambda i: {"loss": 1.0 / (i + 1), "lr": 0.001 * i})


# -- a full disk -------------------------------------------------------------------------


async def test_a_full_disk_loses_rows_only_at_the_end_and_says_how_many(
    disk: SmallDisk, tmp_path: Path
) -> None:
    n = 3000
    cb = CsvMetricsCallback(disk.root / "m.csv")
    cb.max_held_bytes = 4096  # type: ignore[misc]  # past this, the writer gives up
    disk.fill(free=16 * 1024)
    with anyio.fail_after(WAIT):
        # the first steps one by one: the header has its columns before the disk fills
        await drive(cb, make_state(tmp_path, num_steps=n), many(n), wait_first=3)
    rows = read_csv(disk.root / "m.csv")
    written = [int(r["step"]) for r in rows]
    assert written == list(range(len(written)))  # a prefix: no gap, nothing after one
    assert 0 < len(written) < n
    d = cb.degraded
    assert d is not None
    assert (d.rows_lost, d.missing_from_step) == (n - len(written), len(written))
    assert "No space left on device" in d.reason and "m.csv" in d.reason


async def test_local_logger_on_a_full_disk_reports_both_files(
    disk: SmallDisk, tmp_path: Path
) -> None:
    n = 2000
    cb = LocalLoggerCallback(print_every=0)
    cb.max_held_bytes = 4096  # type: ignore[misc]
    state = make_state(disk.root, num_steps=n)
    disk.fill(free=48 * 1024)
    with anyio.fail_after(WAIT):
        await drive(cb, state, many(n))
    steps = jsonl_steps(state.run_dir / "metrics.jsonl")
    assert steps == list(range(len(steps)))
    logged = event_steps(state.run_dir / "events.jsonl")
    assert logged == list(range(len(logged)))
    d = cb.degraded
    assert d is not None
    assert d.missing_from_step == min(len(steps), len(logged))
    # every StepEnded is either in events.jsonl or counted lost, and the same for rows
    assert d.rows_lost >= (n - len(steps)) + (n - len(logged))


async def test_space_coming_back_mid_run_loses_nothing(disk: SmallDisk, tmp_path: Path) -> None:
    """The disk is full from the start (even the header waits); at step 100 the space
    comes back: every row is there, in order, and nothing is reported missing."""
    n = 300
    csv_cb = CsvMetricsCallback(disk.root / "m.csv")
    disk.fill()

    def at(event: Event) -> None:
        if isinstance(event, StepEnded) and event.step == 100:
            assert csv_cb.degraded is not None
            assert csv_cb.degraded.rows_lost == 0  # held, not lost
            assert csv_cb.degraded.missing_from_step is None
            disk.release()

    with anyio.fail_after(WAIT):
        await drive(
            csv_cb, make_state(tmp_path, num_steps=n), many(n), wait_each=True, after_each=at
        )
    rows = read_csv(disk.root / "m.csv")
    assert [int(r["step"]) for r in rows] == list(range(n))
    assert [float(r["loss"]) for r in rows] == [1.0 / (i + 1) for i in range(n)]
    assert csv_cb.degraded is None


async def test_a_read_only_directory_is_reported(disk: SmallDisk, tmp_path: Path) -> None:
    n = 50
    disk.read_only()
    cb = CsvMetricsCallback(disk.root / "sub" / "m.csv")
    with anyio.fail_after(WAIT):
        await drive(cb, make_state(tmp_path, num_steps=n), many(n))
    d = cb.degraded
    assert d is not None
    assert (d.rows_lost, d.missing_from_step) == (n, 0)
    assert "Read-only file system" in d.reason
    assert not (disk.root / "sub" / "m.csv").exists() or disk.mounted is False


async def test_a_vanished_directory_is_reported(tmp_path: Path) -> None:
    n = 40
    cb = LocalLoggerCallback(print_every=0)
    state = make_state(tmp_path, num_steps=n)

    def at(event: Event) -> None:
        if isinstance(event, StepEnded) and event.step == 19:
            shutil.rmtree(state.run_dir)

    with anyio.fail_after(WAIT):
        await drive(cb, state, many(n), wait_each=True, after_each=at)
    d = cb.degraded
    assert d is not None
    assert "removed during the run" in d.reason
    assert d.missing_from_step == 0
    assert d.rows_lost >= n  # every metrics row, and the events with them


# -- the writer itself -------------------------------------------------------------------


def refuse_after(monkeypatch: pytest.MonkeyPatch, budget: int) -> Callable[[int], None]:
    """The writer's write takes ``budget`` more bytes, then refuses (a short write
    first, as a disk that fills mid-write does); returns a function to set it again."""
    real = _writer.os_write
    left = [budget]

    def write(fd: int, data: bytes) -> int:
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real(fd, bytes(data[: left[0]]))
        left[0] -= n
        return n

    monkeypatch.setattr(_writer, "os_write", write)
    return lambda more: left.__setitem__(0, more)


def test_a_short_write_is_cut_back_to_the_last_whole_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "rows.txt"
    allow = refuse_after(monkeypatch, 25)
    w = RowWriter(path, head=b"head\n")
    assert w.open()
    w.write(b"row-0\nrow-1\nrow-2\nrow-3\n", lambda: [0, 1, 2, 3])
    assert path.read_bytes() == b"head\nrow-0\nrow-1\nrow-2\n"  # 25 bytes: row 3 was torn
    assert w.degraded is not None and w.degraded.rows_lost == 0  # held
    allow(10**6)
    w.write(b"row-4\n", lambda: [4])
    assert path.read_bytes() == b"head\n" + b"".join(b"row-%d\n" % i for i in range(5))
    assert w.degraded is None
    w.close()


def test_a_header_widened_on_a_full_disk_is_rewritten_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The atomic rewrite itself is refused (its temp file cannot be written); the
    rows wait with it and land padded under the wider header once the disk takes them."""
    path = tmp_path / "m.csv"
    w = RowWriter(path, head=b"step,a\n")
    w.open()
    w.write(b"0,1.0\n", lambda: [0])

    def pad(line: bytes) -> bytes:
        body = line.rstrip(b"\n")
        return body + b"," * (2 - body.count(b",")) + b"\n"

    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full"))
    )
    w.rewrite(b"step,a,b\n", pad, b"1,,2.0\n", lambda: [1])
    assert path.read_bytes() == b"step,a\n0,1.0\n"  # the old file, whole
    w.write(b"2,3.0,\n", lambda: [2])  # waits behind the rewrite
    assert path.read_bytes() == b"step,a\n0,1.0\n"
    monkeypatch.setattr(os, "replace", real_replace)
    w.write(b"3,,4.0\n", lambda: [3])
    assert path.read_bytes() == b"step,a,b\n0,1.0,\n1,,2.0\n2,3.0,\n3,,4.0\n"
    w.close()
    assert w.degraded is None


def test_rows_held_at_close_are_lost_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_after(monkeypatch, 6)
    w = RowWriter(tmp_path / "r.txt")
    w.open()
    w.write(b"s-10\ns-11\ns-12\n", lambda: [10, 11, 12])
    w.close()
    assert (tmp_path / "r.txt").read_bytes() == b"s-10\n"
    d = w.degraded
    assert d is not None
    assert (d.rows_lost, d.missing_from_step) == (2, 11)
