"""Replay: real runs recorded by local_logger, replayed into the built-in writers, read back.

The command, ``evsys-async replay``, is tested in ``cli/test_replay.py``; the examples of
docs/replay.md in ``docs/test_replay.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import evsys_async as ev
from evsys_async.errors import EventDecodeError
from evsys_async.events import Envelope, EvalEnded, StepEnded, TrainEnded, TrainStarted, encode
from evsys_async.transports import EventLogReader, read_jsonl

pytestmark = pytest.mark.anyio

NUM_STEPS = 30


class Acc:
    """An evaluator: ``acc`` every 5 steps."""

    name = "val"
    run_every = 5

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"acc": step_idx / NUM_STEPS}


async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    metrics = {"loss": 1.0 / (step_idx + 1), "lr": 0.1}
    if step_idx >= 10:  # a key that appears mid-run: the CSV is rewritten once, live
        metrics["grad_norm"] = step_idx * 0.5
    if step_idx == 3:
        metrics["loss"] = math.nan
    if step_idx == 4:
        metrics["loss"] = math.inf
    return metrics


def writers(tensorboard: bool = True) -> list[ev.Callback]:
    specs: list[dict[str, Any]] = [
        {"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}},
        {"kind": "local_logger", "params": {"print_every": 0}},
    ]
    if tensorboard:
        specs.append({"kind": "tensorboard_logger", "params": {}})
    return ev.build_callbacks(specs)


async def live_run(root: Path, key: str = "live", **kw: Any) -> Path:
    loop = ev.TrainingLoop(
        step,
        num_steps=NUM_STEPS,
        output_dir=root,
        run_key=key,
        evaluators=[Acc()],
        callbacks=kw.pop("callbacks", None) or writers(),
        **kw,
    )
    with anyio.fail_after(60):
        await loop.run()
    return root / key


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float | str]]]:
    """Every scalar by tag, read back with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(s.step, "nan" if math.isnan(s.value) else s.value) for s in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def log_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def write_log(path: Path, events: list[ev.Event], *, header: bool = True) -> Path:
    """An event log as a writer of this version writes one (or as before the header)."""
    lines = [ev.transports.log_header(run_key="made")] if header else []
    lines += [encode(Envelope("bus", i, e)) for i, e in enumerate(events)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def run_events(n: int = 6, *, gap: float = 0.0, t0: float = 1000.0) -> list[ev.Event]:
    out: list[ev.Event] = [TrainStarted(num_steps=n, ts=t0, run_key="made")]
    for i in range(n):
        out.append(
            StepEnded(step=i, num_steps=n, metrics={"loss": float(i)}, ts=t0 + gap * (i + 1))
        )
    out.append(TrainEnded(status="completed", steps_completed=n, num_steps=n, ts=t0 + gap * n))
    return out


class Recorder(ev.Callback):
    """Counts what it is given, and what the rebuilt state says at each hook."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int, Any]] = []
        self.other: list[ev.Event] = []
        self.started: list[tuple[int, Path, str, int]] = []
        self.ended: ev.LoopArtifacts | None = None
        self.threads: set[int] = set()

    def setup(self, state: ev.LoopState) -> None:
        self.started.append((state.num_steps, state.run_dir, state.ctx.run_key, state.start_step))

    def on_step_end(self, state: ev.LoopState, step_idx: int, batch: Any, metrics: Any) -> None:
        self.steps.append((step_idx, state.num_steps, state.step, batch))

    def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
        self.other.append(event)

    def on_train_end(self, state: ev.LoopState, artifacts: ev.LoopArtifacts) -> None:
        self.ended = artifacts


# -- same output, value for value -----------------------------------------------------------


async def test_replayed_files_equal_the_live_ones(tmp_path: Path) -> None:
    live = await live_run(tmp_path / "runs")
    source_before = snapshot(live)
    with anyio.fail_after(60):
        report = await ev.replay(live, writers(), output_dir=tmp_path / "again")
    assert report.run_dir == tmp_path / "again" / "live"
    out = report.run_dir
    assert (out / "metrics.csv").read_text() == (live / "metrics.csv").read_text()
    assert (out / "metrics.jsonl").read_bytes() == (live / "metrics.jsonl").read_bytes()
    live_scalars, replayed = scalars(live / "tensorboard"), scalars(out / "tensorboard")
    assert set(live_scalars) == {"loss", "lr", "grad_norm", "val/acc"}
    assert replayed == live_scalars
    assert live_scalars["loss"][3] == (3, "nan")
    # every event went through, once, in order; the source is untouched
    events = [encode(e.event) for e in read_jsonl(live / "events.jsonl")]  # NaN != NaN
    assert [encode(e.event) for e in read_jsonl(out / "events.jsonl")] == events
    assert report.events_read == report.events_published == len(events)
    assert report.ok and report.skipped == [] and report.segments == 1
    assert {h.delivered for h in report.callback_report.values()} >= {len(events)}
    assert snapshot(live) == source_before


async def test_default_output_is_a_new_run_dir_beside_nothing_of_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = await live_run(tmp_path / "runs", callbacks=writers(tensorboard=False))
    monkeypatch.chdir(tmp_path)
    before = snapshot(live)
    with anyio.fail_after(30):
        first = await ev.replay(live / "events.jsonl", writers(tensorboard=False))
        second = await ev.replay("runs/live", writers(tensorboard=False))
    # as a run claims one: runs/<recorded key> is taken, so the next free name
    assert first.run_dir == Path("runs/live-1") and second.run_dir == Path("runs/live-2")
    assert first.run_key == "live"
    assert snapshot(live) == before
    text = (tmp_path / "runs" / "live-2" / "metrics.csv").read_text()
    assert text == (live / "metrics.csv").read_text()


@pytest.fixture(params=["one_second", "a_second_each"])
def event_file_clock(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The clock an event file is named by (``events.out.tfevents.<second>...``):
    stopped, so every file opens in one second (as a quick resume or a replay opens
    them), or a second later at each reading. The test no longer depends on where the
    wall clock's seconds fall."""
    from evsys_async.callbacks import _tfevents

    tick = 0.0 if request.param == "one_second" else 1.0
    readings = itertools.count()
    clock = SimpleNamespace(time=lambda: 1_700_000_000.0 + tick * next(readings))
    monkeypatch.setattr(_tfevents, "time", clock)
    return str(request.param)


async def test_a_resumed_run_replays_to_the_same_files(
    tmp_path: Path, event_file_clock: str
) -> None:
    """The header that recurs at a resume restarts the callbacks with its start step.

    Each segment's TensorBoard file sorts after the one before, in one second too
    (two files once shared that name, and the resume's erased the first segment's).
    """

    def checkpoint(state: ev.LoopState, name: str) -> None:
        return None

    def loop() -> ev.TrainingLoop:
        return ev.TrainingLoop(
            step,
            num_steps=NUM_STEPS,
            output_dir=root,
            run_key="live",
            evaluators=[Acc()],
            callbacks=writers(),
            checkpoint=checkpoint,
            save_every=10,
        )

    root = tmp_path / "runs"
    with anyio.fail_after(60):
        await loop().run(num_steps=25)  # as if killed after step 25: resumed from 20
        await loop().run(start_step=20)
    live = root / "live"
    headers = [json.loads(x) for x in log_lines(live / "events.jsonl") if b'"format"' in x]
    assert [h["start_step"] for h in headers] == [0, 20]
    rec = Recorder()
    with anyio.fail_after(60):
        report = await ev.replay(live, [*writers(), rec], output_dir=tmp_path / "again")
    assert report.segments == 2
    out = tmp_path / "again" / "live"
    assert (out / "metrics.csv").read_text() == (live / "metrics.csv").read_text()
    assert (out / "metrics.jsonl").read_bytes() == (live / "metrics.jsonl").read_bytes()
    tensorboard = scalars(live / "tensorboard")
    # the first segment's steps, then the resume's (TensorBoard purged 20-24 of the first)
    assert [s for s, _ in tensorboard["loss"]] == list(range(NUM_STEPS))
    assert [s for s, _ in tensorboard["val/acc"]] == list(range(4, NUM_STEPS, 5))
    assert scalars(out / "tensorboard") == tensorboard
    # set up twice, the second time as the resumed run was
    assert [(n, s) for n, _, _, s in rec.started] == [(25, 0), (NUM_STEPS, 20)]


async def test_logs_without_a_header_still_replay(tmp_path: Path) -> None:
    """Files written before the header existed: the same envelopes, no first line."""
    live = await live_run(tmp_path / "runs", callbacks=writers(tensorboard=False))
    old = tmp_path / "old.jsonl"
    old.write_bytes(b"\n".join(log_lines(live / "events.jsonl")[1:]) + b"\n")
    assert not old.read_bytes().startswith(b'{"format"')
    with anyio.fail_after(30):
        report = await ev.replay(old, writers(tensorboard=False), output_dir=tmp_path / "again")
    assert report.header is None and report.run_key == "live"
    out = tmp_path / "again" / "live"
    assert (out / "metrics.csv").read_text() == (live / "metrics.csv").read_text()
    assert (out / "metrics.jsonl").read_bytes() == (live / "metrics.jsonl").read_bytes()


# -- the rebuilt state, the thread, the bus ---------------------------------------------------


async def test_hooks_get_a_state_rebuilt_from_the_record(tmp_path: Path) -> None:
    live = await live_run(tmp_path / "runs", callbacks=writers(tensorboard=False))
    rec = Recorder()
    with anyio.fail_after(30):
        report = await ev.replay(live, [rec], output_dir=tmp_path / "again")
    assert rec.started == [(NUM_STEPS, tmp_path / "again" / "live", "live", 0)]
    assert [s for s, _, _, _ in rec.steps] == list(range(NUM_STEPS))
    assert all(n == NUM_STEPS and cur >= s and batch is None for s, n, cur, batch in rec.steps)
    assert rec.ended is not None
    assert (rec.ended.status, rec.ended.steps_completed) == ("completed", NUM_STEPS)
    assert rec.ended.run_dir == report.run_dir
    assert not any(isinstance(e, StepEnded) for e in rec.other)  # on_step_end took them


async def test_reads_off_the_loop_thread_and_publishes_through_the_bus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_log(tmp_path / "events.jsonl", run_events(50))
    reads: set[int] = set()
    published = [0]
    real_read, real_publish = EventLogReader.read, ev.EventBus.publish

    def read(self: EventLogReader) -> Any:
        reads.add(threading.get_ident())
        return real_read(self)

    def publish(self: ev.EventBus, event: ev.Event) -> int | None:
        published[0] += 1
        return real_publish(self, event)

    monkeypatch.setattr(EventLogReader, "read", read)
    monkeypatch.setattr(ev.EventBus, "publish", publish)
    with anyio.fail_after(30):
        report = await ev.replay(path, [Recorder()], output_dir=tmp_path / "out")
    assert reads and threading.get_ident() not in reads
    assert published[0] == report.events_published == 52


async def test_publishing_waits_for_the_slowest_callback(tmp_path: Path) -> None:
    """Memory stays bounded: a callback held back receives the log in bounded batches,
    not all of it at once (without the window the reader would reach the end first)."""
    n = 50_000
    path = write_log(tmp_path / "events.jsonl", run_events(n))
    at_end = threading.Event()
    real_read = EventLogReader.read

    class Held(ev.Callback):
        def __init__(self) -> None:
            self.batch = self.largest = self.count = 0

        def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, m: Any) -> None:
            if self.count == 0:  # held until the reader reached the end, or a second passed
                at_end.wait(1.0)
            self.count += 1
            self.batch += 1

        def flush(self) -> None:
            self.largest = max(self.largest, self.batch)
            self.batch = 0

    def read(self: EventLogReader) -> Any:
        batch = real_read(self)
        if batch is None:
            at_end.set()
        return batch

    held = Held()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(EventLogReader, "read", read)
        with anyio.fail_after(60):
            await ev.replay(path, [held], output_dir=tmp_path / "out")
    assert held.count == n
    assert held.largest < n // 2


async def test_read_events_yields_the_envelopes(tmp_path: Path) -> None:
    live = await live_run(tmp_path / "runs", callbacks=writers(tensorboard=False))
    with anyio.fail_after(30):
        got = [env async for env in ev.read_events(live)]
    assert [encode(env) for env in got] == log_lines(live / "events.jsonl")[1:]  # the header
    assert isinstance(got[0], Envelope) and isinstance(got[0].event, TrainStarted)
    assert [e.seq for e in got] == list(range(len(got)))
    # closing early is clean (the reading thread lets go of the file)
    with anyio.fail_after(30):
        async with contextlib.aclosing(ev.read_events(live)) as envelopes:
            async for env in envelopes:
                assert env.seq == 0
                break


# -- only and speed ---------------------------------------------------------------------------


async def test_only_keeps_the_named_event_types(tmp_path: Path) -> None:
    live = await live_run(tmp_path / "runs", callbacks=writers(tensorboard=False))
    rec = Recorder()
    cbs = [*ev.build_callbacks([{"kind": "csv_metrics", "params": {"out_path": "m.csv"}}]), rec]
    with anyio.fail_after(30):
        report = await ev.replay(live, cbs, only="EvalEnded,TrainEnded", output_dir=tmp_path / "o")
    assert rec.steps == [] and rec.ended is not None
    evals = [e for e in read_jsonl(live / "events.jsonl") if isinstance(e.event, EvalEnded)]
    assert report.events_published == len(evals) + 1
    assert report.events_filtered == report.events_read - report.events_published > 0
    text = (tmp_path / "o" / "live" / "m.csv").read_text().splitlines()
    assert text[0] == "step,val/acc" and len(text) == 1 + len(evals)


async def test_only_names_that_matched_nothing_are_reported(tmp_path: Path) -> None:
    """A name unknown here may be a user's type (kept), or a typo (reported, with the
    closest name)."""
    path = write_log(tmp_path / "events.jsonl", run_events(3))
    with anyio.fail_after(30):
        report = await ev.replay(path, [], only="StepEnd,TrainEnded,Mine", output_dir=tmp_path)
    assert report.events_published == 1
    assert report.only_unmatched == {"StepEnd": "StepEnded", "Mine": None}


async def test_speed_paces_by_the_recorded_timestamps(tmp_path: Path) -> None:
    """Recorded gaps divided by speed bound the replay's duration from below."""
    gap, n, speed = 0.04, 10, 4.0
    path = write_log(tmp_path / "events.jsonl", run_events(n, gap=gap))
    rec = Recorder()
    start = time.monotonic()
    with anyio.fail_after(30):
        report = await ev.replay(path, [rec], speed=speed, output_dir=tmp_path / "out")
    elapsed = time.monotonic() - start
    assert report.events_published == n + 2 and len(rec.steps) == n
    assert elapsed >= gap * n / speed


# -- bad input ------------------------------------------------------------------------------


async def test_a_truncated_last_line_is_reported_and_skipped(tmp_path: Path) -> None:
    path = write_log(tmp_path / "events.jsonl", run_events(4))
    data = path.read_bytes()
    path.write_bytes(data + encode(Envelope("bus", 99, StepEnded(step=4, num_steps=9)))[:40])
    rec = Recorder()
    with anyio.fail_after(30):
        report = await ev.replay(path, [rec], output_dir=tmp_path / "out")
    last = len(data.splitlines()) + 1
    assert [(s.line, "truncated" in s.reason) for s in report.skipped] == [(last, True)]
    assert len(rec.steps) == 4 and report.events_read == 6


async def test_a_malformed_line_stops_with_file_line_and_what(tmp_path: Path) -> None:
    path = write_log(tmp_path / "events.jsonl", run_events(6))
    lines = log_lines(path)
    lines[4] = lines[4].replace(b'"step":2', b'"step":"two"')
    path.write_bytes(b"\n".join(lines) + b"\n")
    cbs = ev.build_callbacks([{"kind": "csv_metrics", "params": {"out_path": "m.csv"}}])
    with (
        anyio.fail_after(30),
        pytest.raises(EventDecodeError, match=r"events\.jsonl:5: .*Expected `int`, got `str`"),
    ):
        await ev.replay(path, cbs, output_dir=tmp_path / "out")
    # what came before was handled, and the file is complete and closed
    rows = (tmp_path / "out" / "made" / "m.csv").read_text().splitlines()
    assert rows == ["step,loss", "0,0.0", "1,1.0"]


async def test_skip_bad_counts_and_reports_with_line_numbers(tmp_path: Path) -> None:
    path = write_log(tmp_path / "events.jsonl", run_events(6))
    lines = log_lines(path)
    lines[4] = b"not json"
    lines[6] = lines[6].replace(b'"seq":', b'"sequence":')
    path.write_bytes(b"\n".join(lines) + b"\n")
    rec = Recorder()
    with anyio.fail_after(30):
        report = await ev.replay(path, [rec], skip_bad=True, output_dir=tmp_path / "out")
    assert [s.line for s in report.skipped] == [5, 7]
    assert "malformed" in report.skipped[0].reason and "seq" in report.skipped[1].reason
    assert [s for s, _, _, _ in rec.steps] == [0, 1, 3, 5]


async def test_unknown_event_types_reach_on_event_as_records(tmp_path: Path) -> None:
    path = write_log(tmp_path / "events.jsonl", run_events(3))
    lines = log_lines(path)
    spike = b'{"bus_id":"bus","seq":7,"event":{"type":"LossSpike","ts":5.0,"run_key":"made","step":1,"loss":9.5,"where":{"layer":[1,2]}}}'
    lines.insert(3, spike)
    path.write_bytes(b"\n".join(lines) + b"\n")
    rec = Recorder()
    logger = ev.build_callbacks([{"kind": "local_logger", "params": {"print_every": 0}}])
    with anyio.fail_after(30):
        report = await ev.replay(path, [rec, *logger], output_dir=tmp_path / "out")
    (unknown,) = [e for e in rec.other if isinstance(e, ev.events.UnknownEvent)]
    assert unknown.event_type == "LossSpike" and unknown.ts == 5.0
    assert unknown.fields == {"step": 1, "loss": 9.5, "where": {"layer": [1, 2]}}
    assert report.unknown_types == {"LossSpike": 1}
    # written back as the event it stands for
    again = tmp_path / "out" / "made" / "events.jsonl"
    # (with the base fields it lacked at their defaults: a missing rank is rank 0)
    expected = {"rank": 0, **json.loads(spike)["event"]}
    assert expected in [json.loads(x)["event"] for x in log_lines(again)[1:]]
    # only= matches the recorded type name
    rec2 = Recorder()
    with anyio.fail_after(30):
        await ev.replay(path, [rec2], only=["LossSpike"], output_dir=tmp_path / "out")
    assert [type(e).__name__ for e in rec2.other] == ["UnknownEvent"]


async def test_a_newer_format_version_says_so_and_stops(tmp_path: Path) -> None:
    path = write_log(tmp_path / "events.jsonl", run_events(3))
    lines = log_lines(path)
    lines[0] = lines[0].replace(b'"version":1', b'"version":2')
    path.write_bytes(b"\n".join(lines) + b"\n")
    rec = Recorder()
    with (
        anyio.fail_after(30),
        pytest.raises(EventDecodeError, match=r"events\.jsonl:1: .*version is 2.* newer .*upgrade"),
    ):
        await ev.replay(path, [rec], skip_bad=True, output_dir=tmp_path / "out")
    assert rec.steps == [] and not (tmp_path / "out").exists()


async def test_a_missing_source_names_what_is_missing(tmp_path: Path) -> None:
    with (
        anyio.fail_after(10),
        pytest.raises(FileNotFoundError, match=r"has no events\.jsonl: .*local_logger"),
    ):
        await ev.replay(tmp_path, [])
    with (
        anyio.fail_after(10),
        pytest.raises(FileNotFoundError, match="no such event log or run directory"),
    ):
        await ev.replay(tmp_path / "nope", [])


def test_read_jsonl_skips_headers_and_reads_old_logs(tmp_path: Path) -> None:
    events = run_events(3)
    new = write_log(tmp_path / "new.jsonl", events)
    old = write_log(tmp_path / "old.jsonl", events, header=False)
    assert [e.event for e in read_jsonl(new)] == [e.event for e in read_jsonl(old)] == events


def test_reader_reads_long_logs_in_blocks_with_line_numbers(tmp_path: Path) -> None:
    """Blocks decode in one call each; a bad line deep in a later block is still named."""
    events = run_events(3000)
    path = write_log(tmp_path / "events.jsonl", events)
    lines = log_lines(path)
    lines[2500] = b'{"bus_id":"bus","seq":1,"event":{"type":"StepEnded"}}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    reader = EventLogReader(path, block_size=4096)
    with pytest.raises(EventDecodeError, match=r":2501: .*missing required field `step`"):
        list(reader)
    reader.close()
    reader = EventLogReader(path, block_size=4096, skip_bad=True)
    got = [env.event for batch in reader for env in batch.envelopes]
    assert got == events[:2499] + events[2500:]
    assert [s.line for s in reader.skipped] == [2501]


def test_jsonl_sink_writes_a_header_each_time_it_opens(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    for i in range(2):  # a reopened log goes on numbering (or has a bus id of its own)
        sink = ev.transports.JsonlSink(path)
        sink(Envelope("b", i, StepEnded(step=0, num_steps=1, run_key="k")))
        sink.close()
    heads = [json.loads(x) for x in log_lines(path) if b'"format"' in x]
    assert [(h["run_key"], h["version"]) for h in heads] == [("k", 1), ("k", 1)]
    assert len(list(read_jsonl(path))) == 2


def test_version_1_reads_events_with_and_without_rank(tmp_path: Path) -> None:
    """Version 1 has ``rank`` on events; logs written before events carried it say so in
    the header, and both read (a missing rank is rank 0; unknown fields are ignored)."""
    path = write_log(tmp_path / "events.jsonl", run_events(2))
    lines = log_lines(path)
    header = json.loads(lines[0])
    assert header["rank_on_events"] is ("rank" in ev.Event.__struct_fields__)
    header["a_later_field"] = {"x": 1}  # a later version-1 writer may add header fields
    lines[0] = json.dumps(header).encode()
    lines[3] = (
        lines[3]
        .replace(b'"rank":0,', b"")
        .replace(b'"type":"StepEnded",', b'"type":"StepEnded","rank":1,')
    )
    lines[2] = lines[2].replace(b'"rank":0,', b"")  # as a writer before ranks wrote it
    path.write_bytes(b"\n".join(lines) + b"\n")
    reader = EventLogReader(path)
    batches = list(reader)
    assert batches[0].header is not None and batches[0].header.version == 1
    got = [env.event for batch in batches for env in batch.envelopes]
    assert [type(e).__name__ for e in got] == [
        "TrainStarted",
        "StepEnded",
        "StepEnded",
        "TrainEnded",
    ]
    assert getattr(got[2], "rank", 1) == 1 and getattr(got[1], "rank", 0) == 0


async def test_bad_callbacks_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = write_log(tmp_path / "events.jsonl", run_events(2))

    class WrongHook(ev.Callback):
        def on_step_end(self, state: ev.LoopState) -> None:  # type: ignore[override]
            pass

    csv = ev.build_callbacks([{"kind": "csv_metrics", "params": {"out_path": "m.csv"}}])[0]
    for callbacks, error, words in (
        ([WrongHook()], TypeError, "cannot take the hook's arguments"),
        ([csv, csv], ValueError, r"callbacks\[1\] is the same CsvMetricsCallback instance"),
        ([object()], TypeError, r"callbacks\[0\] is <object .*>, not a Callback"),
    ):
        with anyio.fail_after(10), pytest.raises(error, match=words):
            await ev.replay(path, callbacks, output_dir=tmp_path / "out")  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


# -- hostile input: values nested too deep, envelopes repeated ------------------------------

DEEP = b"[" * 10_000 + b"]" * 10_000


def deep_envelope(seq: int) -> bytes:
    """An envelope whose event nests 10,000 levels in a field msgspec decodes as Any."""
    return (
        b'{"bus_id":"bus","seq":%d,"event":{"type":"TrainStarted","ts":1.0,"run_key":"made",'
        b'"num_steps":6,"start_step":0,"output_dir":"x","config":{"a":%s}}}' % (seq, DEEP)
    )


@pytest.mark.parametrize(
    "damage",
    ["deep_envelope", "deep_header_place", "unterminated_last_line", "deep_in_a_string_is_fine"],
)
async def test_a_line_nested_too_deep_is_malformed_never_a_recursion_error(
    tmp_path: Path, damage: str
) -> None:
    """Depth is measured before decoding: without skip_bad a typed error naming
    file:line; with it the line is skipped and listed; brackets in strings do not count."""
    path = write_log(tmp_path / "events.jsonl", run_events(6))
    lines = log_lines(path)
    if damage == "deep_envelope":
        lines.insert(3, deep_envelope(50))
        where, tail = 4, b"\n"
    elif damage == "deep_header_place":
        lines.insert(0, DEEP)
        where, tail = 1, b"\n"
    elif damage == "unterminated_last_line":
        where, tail = len(lines) + 1, b"\n" + b"[" * 10_000
    else:
        lines[3] = lines[3].replace(b'"loss":', b'"loss ' + b"[" * 5000 + b'":')
        where, tail = 0, b"\n"
    path.write_bytes(b"\n".join(lines) + tail)
    if damage == "deep_in_a_string_is_fine":
        with anyio.fail_after(30):
            report = await ev.replay(path, [Recorder()], output_dir=tmp_path / "out")
        assert report.skipped == [] and report.events_read == 8
        return
    with (
        anyio.fail_after(30),
        pytest.raises(
            EventDecodeError, match=rf"events\.jsonl:{where}: .*nested deeper than 128 levels"
        ) as caught,
    ):
        await ev.replay(path, [Recorder()], output_dir=tmp_path / "out")
    assert "--skip-bad" in str(caught.value) and caught.value.__context__ is None
    rec = Recorder()
    with anyio.fail_after(30):
        report = await ev.replay(path, [rec], skip_bad=True, output_dir=tmp_path / "out")
    assert [(s.line, "nested deeper than 128" in s.reason) for s in report.skipped] == [
        (where, True)
    ]
    assert [s for s, _, _, _ in rec.steps] == list(range(6))


def test_the_reader_and_the_codec_refuse_depth_past_the_limit_but_not_at_it(
    tmp_path: Path,
) -> None:
    at_limit = b"[" * 126 + b"]" * 126  # envelope + event + config + 126 = 129 > 128
    ok = at_limit[1:-1]  # 128 levels in all
    for value, refused in ((ok, False), (at_limit, True)):
        line = (
            b'{"bus_id":"b","seq":0,"event":{"type":"TrainStarted","ts":1.0,"run_key":"k",'
            b'"num_steps":1,"start_step":0,"output_dir":"x","config":{"a":%s}}}' % value
        )
        path = tmp_path / "e.jsonl"
        path.write_bytes(line + b"\n")
        if refused:
            with pytest.raises(EventDecodeError, match="nested deeper than 128"):
                list(read_jsonl(path))
            with pytest.raises(EventDecodeError, match="nested deeper than 128"):
                ev.events.decode_envelope(line)
        else:
            assert len(list(read_jsonl(path))) == 1
            assert ev.events.decode_envelope(line).seq == 0


async def test_duplicated_envelopes_are_skipped_and_counted(tmp_path: Path) -> None:
    """2,000 steps with 99 envelopes written twice (next to each other and far apart):
    2,000 CSV rows, 99 duplicates in the report. A resumed segment has its own bus id."""
    events = run_events(2000)
    lines = [ev.transports.log_header(run_key="made")]
    lines += [encode(Envelope("bus", i, e)) for i, e in enumerate(events)]
    repeats = [*range(1, 1000, 20), *range(1500, 1549)]
    assert len(repeats) == 99
    out = list(lines)
    for n, i in enumerate(repeats):
        at = i + 1 + n + (1 if n % 2 else 300)  # right after it, or some way on
        out.insert(min(at, len(out) - 1), lines[i + 1])
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(out) + b"\n")
    cbs = ev.build_callbacks([{"kind": "csv_metrics", "params": {"out_path": "m.csv"}}])
    with anyio.fail_after(60):
        report = await ev.replay(path, cbs, output_dir=tmp_path / "out")
    assert report.duplicates == 99 and report.events_read == len(events)
    rows = (tmp_path / "out" / "made" / "m.csv").read_text().splitlines()
    assert len(rows) == 1 + 2000 and [r.split(",")[0] for r in rows[1:]] == [
        str(i) for i in range(2000)
    ]
    # read_events leaves them out too; another bus id with the same numbers is no repeat
    other = [encode(Envelope("bus-2", i, e)) for i, e in enumerate(run_events(3))]
    path.write_bytes(b"\n".join([*out, *other]) + b"\n")
    async with contextlib.aclosing(ev.read_events(path)) as envelopes:
        got = [(e.bus_id, e.seq) async for e in envelopes]
    assert len(got) == len(set(got)) == len(events) + 5
