"""The Redis sink's spill file: order kept, a torn last record left out, leftovers taken up."""

from __future__ import annotations

from pathlib import Path

from evsys_async.transports._spill import SpillFile


def test_records_come_back_in_order_and_the_file_empties(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "s.bin")
    spill.append([("a", b"1"), ("b", b"2\n\x00")])
    spill.append([("a", b"3")])
    records, offset = spill.peek(2)
    assert records == [("a", b"1"), ("b", b"2\n\x00")]
    spill.consume(2, offset)
    assert len(spill) == 1
    records, offset = spill.peek(10)
    spill.consume(len(records), offset)
    assert records == [("a", b"3")] and len(spill) == 0
    assert spill.path.stat().st_size == 0
    spill.close()
    assert not spill.path.exists()


def test_a_torn_last_record_is_left_out_and_leftovers_go_first(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    first = SpillFile(path)
    first.append([("s", b"old-1"), ("s", b"old-2")])
    first.compact([("s", b"older")])  # what was in memory goes in front
    first.close(remove_if_empty=False)
    with open(path, "ab") as f:
        f.write(b"\x00\x00\x00\x01\x00\x00\x00\x09sab")  # a crash mid-write
    later = SpillFile(path)
    assert later.open_existing() == 3
    later.append([("s", b"new")])
    records, _ = later.peek(10)
    assert [data for _, data in records] == [b"older", b"old-1", b"old-2", b"new"]
    later.close(remove_if_empty=False)
