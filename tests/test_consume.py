"""``consume`` and ``tail``: a run followed from other processes, through the CLI and the API."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async import cli
from evsys_async.callbacks import SinkCallback
from evsys_async.config import load_callbacks
from evsys_async.consume import RanksEnded, consume
from evsys_async.events import Envelope, StepEnded, TrainEnded, TrainStarted, encode
from evsys_async.transports import RedisStreamSink
from evsys_async.transports.redis import events_stream

CALLBACKS = """\
- {kind: csv_metrics, params: {out_path: metrics.csv}}
- {kind: local_logger, params: {print_every: 0}}
"""


@pytest.fixture
def run_key(redis_url: str) -> Iterator[str]:
    import redis

    key = f"test-{uuid.uuid4().hex[:12]}"
    yield key
    client = redis.Redis.from_url(redis_url)
    client.delete(*(f"evsys:{key}:{kind}" for kind in ("events", "dead", "consumers")))
    client.close()


class Every:
    name = "val"
    run_every = 20

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"acc": step_idx / 1000}


def produce(url: str, run_key: str, out: Path, num_steps: int = 300) -> None:
    """A whole run into the stream (then the consumers start)."""

    async def step(state: ev.LoopState, i: int) -> dict[str, float]:
        return {"loss": 1.0 / (i + 1), **({"extra": float(i)} if i >= 100 else {})}

    async def main() -> None:
        loop = ev.TrainingLoop(
            step,
            num_steps=num_steps,
            output_dir=out,
            run_key=run_key,
            evaluators=[Every()],
            callbacks=[SinkCallback(RedisStreamSink(url))],
        )
        assert (await loop.run()).status == "completed"

    anyio.run(main)


CONSUMER = textwrap.dedent(
    """
    import os, sys, time
    import anyio
    from evsys_async.callbacks import Callback
    from evsys_async.config import load_callbacks
    from evsys_async.consume import consume

    class Gate(Callback):
        '''Blocks the consumer at one step, so the test can kill it there.'''
        def __init__(self, at):
            self.at = at
        def on_step_end(self, state, step_idx, batch, metrics):
            if step_idx == self.at:
                print("GATE", flush=True)
                time.sleep(3600)

    url, key, group, out, cbfile = sys.argv[1:6]
    callbacks = load_callbacks(cbfile)
    callbacks.append(Gate(int(os.environ["GATE_AT"])))
    anyio.run(lambda: consume(url, key, group=group, callbacks=callbacks, output_dir=out, count=16))
    """
)


def test_a_consumer_killed_mid_stream_resumes_and_writes_what_an_uninterrupted_one_does(
    redis_url: str, run_key: str, tmp_path: Path
) -> None:
    produce(redis_url, run_key, tmp_path / "producer")
    cbfile = tmp_path / "callbacks.yaml"
    cbfile.write_text(CALLBACKS)

    # the reference: one consumer from start to end
    reference = anyio.run(
        lambda: consume(
            redis_url,
            run_key,
            group="reference",
            callbacks=load_callbacks(cbfile),
            output_dir=tmp_path / "reference",
        )
    )
    assert reference.resumed_at is None and reference.published == 300 + 15 + 2

    # killed with SIGKILL while a batch is in hand (rows of it already written)
    script = tmp_path / "consumer.py"
    script.write_text(CONSUMER)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), redis_url, run_key, "g", str(killed), str(cbfile)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "GATE_AT": "150"},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "GATE"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    partial = (killed / run_key / "metrics.csv").read_text().splitlines()
    assert 10 < len(partial) < 300  # it had written part of the run

    # started again (through the CLI), same group and consumer name
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "evsys_async",
            "consume",
            redis_url,
            run_key,
            "--group",
            "g",
            "--callbacks",
            str(cbfile),
            "--output-dir",
            str(killed),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert ", resumed at step " in out.stdout
    assert f"files: {(killed / run_key).resolve()}/" in out.stdout
    for name in ("metrics.csv", "metrics.jsonl"):
        assert (killed / run_key / name).read_text() == (reference.run_dir / name).read_text()


def test_consume_cli_names_a_bad_callbacks_file_place(
    redis_url: str, run_key: str, tmp_path: Path
) -> None:
    cbfile = tmp_path / "cbs.yaml"
    cbfile.write_text("- {kind: csv_metrics, params: {out_path: m.csv}}\n- {kind: csv_metrix}\n")
    err = io.StringIO()
    code = cli.run_cli(
        ["consume", redis_url, run_key, "--group", "g", "--callbacks", str(cbfile)],
        out=io.StringIO(),
        err=err,
    )
    assert code == 2
    assert f"{cbfile}:2: callbacks[1].kind" in err.getvalue()
    assert "did you mean 'csv_metrics'?" in err.getvalue()
    cbfile.write_text("callbacks: {kind: csv_metrics}\n")
    code = cli.run_cli(
        ["consume", redis_url, run_key, "--group", "g", "--callbacks", str(cbfile)],
        out=io.StringIO(),
        err=err,
    )
    assert code == 2 and "callbacks" in err.getvalue().splitlines()[-1]


def _write(url: str, run_key: str, events: list[ev.Event], bus: str = "b") -> None:
    import redis

    client = redis.Redis.from_url(url)
    for seq, event in enumerate(events):
        client.xadd(events_stream(run_key), {"envelope": encode(Envelope(bus, seq, event))})
    client.close()


def _two_ranks(run_key: str, *, status: str = "stopped") -> list[ev.Event]:
    events: list[ev.Event] = []
    for rank in (0, 1):
        events.append(TrainStarted(num_steps=10, world_size=2, rank=rank, run_key=run_key))
    for step in range(4):
        for rank in (0, 1):
            metrics = {"loss": 1.0 / (step + 1)}
            events.append(StepEnded(step=step, num_steps=10, metrics=metrics, rank=rank))
    for rank in (0, 1):
        events.append(
            TrainEnded(
                status=status,
                steps_completed=4,
                num_steps=10,
                stop_reason="early stop on val/acc",
                stop_rank=1,
                rank=rank,
            )
        )
    return events


def test_tail_prints_one_rank_and_ends_after_every_rank_ended(redis_url: str, run_key: str) -> None:
    _write(redis_url, run_key, _two_ranks(run_key))
    out = io.StringIO()
    code = cli.run_cli(["tail", redis_url, run_key, "--every", "2"], out=out, err=io.StringIO())
    assert code == 0
    assert out.getvalue().splitlines() == [
        "[1/10] loss=1.0000",
        "[2/10] loss=0.5000",
        "[4/10] loss=0.2500",
        "rank 0: stopped after 4 of 10 steps: early stop on val/acc (requested by rank 1)",
        "rank 1: stopped after 4 of 10 steps: early stop on val/acc (requested by rank 1)",
    ]


def test_tail_says_once_that_it_waits_for_a_run_not_started_yet(
    redis_url: str, run_key: str
) -> None:
    """No stream yet: one line on stderr, then the run's lines once it appears (the
    line is read before the events are written, so no clock orders anything)."""
    import select

    from evsys_async._util.secrets import redact_url

    proc = subprocess.Popen(
        [sys.executable, "-m", "evsys_async", "tail", redis_url, run_key, "--every", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    try:
        assert proc.stderr is not None
        ready, _, _ = select.select([proc.stderr], [], [], 60)
        assert ready, "tail said nothing about waiting"
        first = proc.stderr.readline()
        assert first == (
            f"evsys-async tail: waiting for run {run_key!r}: no stream evsys:{run_key}:events on "
            f"{redact_url(redis_url)} yet (it appears when the run starts)\n"
        ), first
        _write(redis_url, run_key, _two_ranks(run_key))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "waiting" not in err  # said once
    assert out.splitlines()[0] == "[1/10] loss=1.0000"
    # a stream that is there: no word about waiting
    err_now = io.StringIO()
    assert cli.run_cli(["tail", redis_url, run_key], out=io.StringIO(), err=err_now) == 0
    assert err_now.getvalue() == ""


def test_tail_exits_1_when_the_run_failed(redis_url: str, run_key: str) -> None:
    _write(redis_url, run_key, _two_ranks(run_key, status="failed"))
    code = cli.run_cli(["tail", redis_url, run_key], out=io.StringIO(), err=io.StringIO())
    assert code == 1


def test_tail_without_redis_is_one_line_and_exit_1() -> None:
    from tests.servers import free_port

    err = io.StringIO()
    url = f"redis://:pw-planted@127.0.0.1:{free_port()}/0"
    assert cli.run_cli(["tail", url, "x"], out=io.StringIO(), err=err) == 1
    assert err.getvalue().startswith("evsys-async: cannot reach Redis at redis://:***@127.0.0.1")
    assert "pw-planted" not in err.getvalue() and err.getvalue().count("\n") == 1


def test_ranks_ended_waits_for_every_rank_and_a_resume_counts_again() -> None:
    until = RanksEnded()
    assert not until(TrainStarted(num_steps=5, world_size=2, rank=0))
    assert not until(TrainEnded(status="cancelled", steps_completed=1, num_steps=5, rank=0))
    assert not until(TrainStarted(num_steps=5, world_size=2, rank=0, start_step=1))
    assert not until(TrainEnded(status="completed", steps_completed=5, num_steps=5, rank=1))
    assert until(TrainEnded(status="completed", steps_completed=4, num_steps=5, rank=0))
    assert RanksEnded(rank=1)(
        TrainEnded(status="completed", steps_completed=5, num_steps=5, rank=1)
    )


def test_consume_follows_every_rank_into_its_own_run_dir(
    redis_url: str, run_key: str, tmp_path: Path
) -> None:
    _write(redis_url, run_key, _two_ranks(run_key))
    seen: list[tuple[int, int]] = []

    class Record(ev.Callback):
        def on_event(self, state: ev.LoopState, event: ev.Event) -> None:
            if isinstance(event, StepEnded):
                seen.append((event.rank, event.step))

    (tmp_path / run_key).mkdir()  # the producer's, say: the consumer takes a new one
    (tmp_path / run_key / "x").write_text("x")
    result: Any = anyio.run(
        lambda: consume(redis_url, run_key, group="all", callbacks=[Record()], output_dir=tmp_path)
    )
    assert sorted(seen) == [(r, s) for r in (0, 1) for s in range(4)]
    assert sorted(result.ended) == [0, 1]
    assert result.run_dir == (tmp_path / f"{run_key}-1").resolve()
    assert result.callback_report["Record"].delivered == 12
