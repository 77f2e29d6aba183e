"""Drive one callback through the real bus, without the loop; read files back."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio

import evsys_async as ev
from evsys_async.callbacks._adapter import CallbackAdapter
from evsys_async.events import Event, StepEnded, TrainEnded, TrainStarted

#: the fail_after around every test's waits: generous, never reached when all is well
WAIT = 30.0


def make_state(
    tmp_path: Path, *, run_key: str = "r1", num_steps: int = 10, **kw: Any
) -> ev.LoopState:
    ctx = ev.LogContext(output_dir=tmp_path, run_key=run_key)
    return ev.LoopState(num_steps=num_steps, output_dir=tmp_path, ctx=ctx, **kw)


def run_events(
    num_steps: int,
    metrics: Any = None,
    *,
    evals: dict[int, dict[str, float]] | None = None,
    status: str = "completed",
) -> list[Event]:
    """TrainStarted, num_steps StepEnded (with ``metrics(i)``), evals after their step, TrainEnded."""
    events: list[Event] = [TrainStarted(num_steps=num_steps)]
    for i in range(num_steps):
        m = metrics(i) if metrics is not None else {"loss": 1.0 / (i + 1)}
        events.append(StepEnded(step=i, num_steps=num_steps, metrics=m))
        if evals and i in evals:
            events.append(ev.events.EvalEnded(step=i, eval_name="val", metrics=evals[i]))
    events.append(TrainEnded(status=status, steps_completed=num_steps, num_steps=num_steps))
    return events


async def drive(
    cb: ev.Callback,
    state: ev.LoopState,
    events: Iterable[Event],
    *,
    wait_each: bool = False,
    after_each: Any = None,
    wait_first: int = 0,
) -> ev.Subscription:
    """Subscribe ``cb`` on a real bus, publish ``events``, then ``aclose`` (drain + teardown).

    ``wait_each``: each event is handled before the next is published (then
    ``after_each(event)`` runs); ``wait_first=k``: only the first ``k`` are.
    """
    async with ev.EventBus() as bus:
        adapter = CallbackAdapter(cb, state)
        sub = adapter.subscribe(bus)
        for i, event in enumerate(events):
            if wait_each or i < wait_first:
                with anyio.fail_after(10):
                    report = await bus.publish_and_wait(event, timeout=10)
                assert report.ok, report
                if after_each is not None:
                    after_each(event)
            else:
                bus.publish(event)
        with anyio.fail_after(20):
            assert await sub.aclose(20)
    return sub


def read_tfevents(log_dir: Path) -> list[tuple[str, int, float]]:
    """Every scalar (tag, step, value) in the TensorBoard event files under ``log_dir``.

    A TFRecord file is a sequence of ``len (u64) | crc (u32) | data | crc (u32)``;
    the data is an ``Event`` protobuf (tensorboardX ships the compiled schema).
    """
    from tensorboardX.proto import event_pb2

    out: list[tuple[str, int, float]] = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        off = 0
        while off + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[off : off + 8])
            off += 12
            record = data[off : off + n]
            off += n + 4
            event = event_pb2.Event()
            event.ParseFromString(record)
            for value in event.summary.value:
                out.append((value.tag, event.step, value.simple_value))
    return out


def read_wandb_records(path: Path) -> Iterator[Any]:
    """Records of a ``.wandb`` transaction log (LevelDB-log framing, wandb's own protobuf).

    Header: ``:W&B`` + magic 0xBEE1 + version (7 bytes). Then 32 KiB blocks of
    chunks ``crc (u32) | length (u16) | type (u8) | data``; type 1 is a whole
    record, 2/3/4 the first/middle/last piece of one.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block = 32768
    off = 7
    pending = b""
    while off + 7 <= len(data):
        left = block - off % block
        if left < 7:
            off += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[off : off + 7])
        off += 7
        chunk = data[off : off + length]
        off += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            pending = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        elif kind == 4:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


def _finished_wandb_log(path: Path, timeout: float = 10.0) -> list[Any]:
    """The records of a run's log once wandb's own process has written its ``exit``
    record: ``run.finish()`` can return a moment before that process is done with
    the file. It is another process, so there is no event to wait on: look again."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(read_wandb_records(path))
        except Exception:  # a record half written: look again
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"wandb never finished writing {path}"
        time.sleep(0.02)


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of the one offline wandb run under ``run_dir``."""
    import json

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = _finished_wandb_log(path)
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
    return rows
