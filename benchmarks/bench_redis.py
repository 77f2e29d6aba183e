"""Events per second from a training loop to a consumer group through Redis, next to raw
redis-py doing the same work.

* **evsys**: a ``TrainingLoop`` whose step returns a fixed set of metrics publishes
  ``StepEnded`` events; a ``RedisStreamSink`` (its sender thread, pipelines of
  ``--pipeline`` entries) appends them to the run's stream; in another process a
  ``RedisStreamSource`` in consumer group ``bench`` (``count`` = the same
  pipeline size) publishes them on a local bus to one counting ``def`` handler,
  and acknowledges each batch after the drain.
* **raw**: the same encoded envelopes, ``XADD`` pipelined in chunks of the same
  size with the same ``MAXLEN ~`` from this process, and in another process
  ``XREADGROUP`` (same count) + ``XACK`` of each batch: the target's baseline.
* **raw + scripts**: raw redis-py with the two server-side scripts the sink and
  the source use (one ``EVALSHA`` adds a chunk; one reads a batch as a flat
  reply), same sizes: the best raw we know, to show what evsys itself costs.

Each case is timed from the producer's start until the consumer process says it
has acknowledged every entry (it was blocked in ``XREADGROUP`` before the start,
so both sides run at once); events/s = events / that time. The consumers count
what they handled, and a figure is printed only if the count is right. Cases
alternate within each round (their order flips every round), medians of
``--rounds`` (>= 7) with the spread.

    python benchmarks/bench_redis.py [--events 20000] [--pipeline 512] [--rounds 7]
        [--url redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_count, fmt, machine, med, print_table, run_main, spread

import evsys_async as ev
from evsys_async.callbacks import SinkCallback
from evsys_async.events import Envelope, StepEnded, TrainEnded, encode
from evsys_async.transports import RedisStreamSink, RedisStreamSource
from evsys_async.transports._redis import READ_GROUP, XADD_ALL
from evsys_async.transports.redis import events_stream

METRICS = {"loss": 0.6931471805599453, "lr": 0.0003, "grad_norm": 1.2345678, "tokens": 4096.0}
MAXLEN = 1_000_000


# -- the consumer process ------------------------------------------------------------------


def consumer(mode: str, url: str, key: str, pipeline: int, expected: int) -> None:
    """Create the group, say READY, consume every entry, say DONE <count>."""
    import redis

    stream = events_stream(key)
    client = redis.Redis.from_url(url)
    client.xgroup_create(stream, "bench", id="0", mkstream=True)
    if mode == "scripts":
        sha = client.script_load(READ_GROUP)
        print("READY", flush=True)
        count = 0
        while count < expected:
            ids, _bodies = client.evalsha(sha, 1, stream, "bench", "c", pipeline)
            if not ids:  # nothing new: wait for it as the source does
                reply = client.xreadgroup("bench", "c", {stream: ">"}, count=pipeline, block=1000)
                got = [entry_id for entry_id, _ in reply[0][1]] if reply else []
            else:
                got = ids.split(b" ")
            if got:
                client.xack(stream, "bench", *got)
                count += len(got)
        print(f"DONE {count}", flush=True)
        return
    if mode == "raw":
        print("READY", flush=True)
        count = 0
        while count < expected:
            reply = client.xreadgroup("bench", "c", {stream: ">"}, count=pipeline, block=1000)
            if not reply:
                continue
            ids = [entry_id for entry_id, _ in reply[0][1]]
            client.xack(stream, "bench", *ids)
            count += len(ids)
        print(f"DONE {count}", flush=True)
        return

    handled = 0

    def count(event: ev.Event) -> None:
        nonlocal handled
        handled += 1

    async def main() -> None:
        source = RedisStreamSource(url, key, group="bench", consumer="c", count=pipeline)
        await anyio.to_thread.run_sync(source.prepare)
        async with ev.EventBus() as bus:
            bus.subscribe(count)
            print("READY", flush=True)
            await source.forward(bus, until=lambda e: isinstance(e, TrainEnded))
        source.close()

    anyio.run(main)
    print(f"DONE {handled}", flush=True)


# -- the producer side ------------------------------------------------------------------------


def start_consumer(mode: str, url: str, key: str, pipeline: int, expected: int) -> Any:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--consumer", mode, url, key, str(pipeline), str(expected)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "READY":
        raise RuntimeError(f"the {mode} consumer did not start: {line!r}")
    return proc


def wait_done(proc: Any, expected: int, what: str) -> float:
    """Wait for the consumer's DONE line; the time it arrived (before the process exits)."""
    line = proc.stdout.readline().strip()
    done = time.perf_counter()
    proc.wait(60)
    proc.stdout.close()
    if not line.startswith("DONE "):
        raise RuntimeError(f"{what}: the consumer ended with {line!r}")
    check_count(what, int(line.split()[1]), expected)
    return done


def run_raw(url: str, events: int, pipeline: int, scripts: bool = False) -> float:
    import redis

    key = f"bench-{uuid.uuid4().hex[:8]}"
    stream = events_stream(key)
    payloads = [
        encode(
            Envelope("raw", i, StepEnded(step=i, num_steps=events, metrics=METRICS, run_key=key))
        )
        for i in range(events)
    ]
    mode = "scripts" if scripts else "raw"
    proc = start_consumer(mode, url, key, pipeline, events)
    client = redis.Redis.from_url(url)
    sha = client.script_load(XADD_ALL)
    try:
        t0 = time.perf_counter()
        for start in range(0, events, pipeline):
            chunk = payloads[start : start + pipeline]
            if scripts:
                client.evalsha(sha, 1, stream, MAXLEN, *chunk)
                continue
            pipe = client.pipeline(transaction=False)
            for data in chunk:
                pipe.xadd(stream, {"envelope": data}, maxlen=MAXLEN, approximate=True)
            pipe.execute()
        elapsed = wait_done(proc, events, mode) - t0
    finally:
        client.delete(stream)
        client.close()
    return events / elapsed


def run_evsys(url: str, events: int, pipeline: int) -> float:
    import redis

    key = f"bench-{uuid.uuid4().hex[:8]}"
    total = events + 2  # TrainStarted, the steps, TrainEnded
    proc = start_consumer("evsys", url, key, pipeline, total)

    async def step(state: ev.LoopState, i: int) -> dict[str, float]:
        return METRICS

    async def main() -> None:
        with_tmp = Path(f"/tmp/evsys-bench-redis/{key}")
        sink = RedisStreamSink(url, pipeline_size=pipeline, maxlen=MAXLEN)
        loop = ev.TrainingLoop(
            step,
            num_steps=events,
            output_dir=with_tmp.parent,
            run_key=key,
            callbacks=[SinkCallback(sink)],
        )
        await loop.run()
        check_count("evsys sink", sink.stats().sent, total)

    try:
        t0 = time.perf_counter()
        anyio.run(main)
        elapsed = wait_done(proc, total, "evsys") - t0
    finally:
        client = redis.Redis.from_url(url)
        client.delete(events_stream(key))
        client.close()
    return total / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--pipeline", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--consumer", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consumer:
        mode, url, key, pipeline, expected = args.consumer
        consumer(mode, url, key, int(pipeline), int(expected))
        return
    print(machine())
    print(
        f"{args.events} events a run, pipeline/count {args.pipeline}, {args.rounds} rounds, "
        f"Redis at {args.url}"
    )
    cases = ("raw", "scripts", "evsys")
    rates: dict[str, list[float]] = {case: [] for case in cases}
    ratios: dict[str, list[float]] = {"raw": [], "scripts": []}
    for r in range(args.rounds):
        order = cases if r % 2 == 0 else cases[::-1]
        got: dict[str, float] = {}
        for case in order:
            if case == "evsys":
                got[case] = run_evsys(args.url, args.events, args.pipeline)
            else:
                got[case] = run_raw(args.url, args.events, args.pipeline, case == "scripts")
            rates[case].append(got[case])
        for base in ratios:
            ratios[base].append(got["evsys"] / got[base])
        print(
            f"  round {r + 1}: raw {got['raw']:,.0f}/s  raw+scripts {got['scripts']:,.0f}/s  "
            f"evsys {got['evsys']:,.0f}/s",
            flush=True,
        )
    rows = [
        [
            "raw redis-py: pipelined XADD + XREADGROUP/XACK",
            fmt(med(rates["raw"])),
            spread(rates["raw"]),
            "",
        ],
        [
            "raw redis-py + the same server-side scripts",
            fmt(med(rates["scripts"])),
            spread(rates["scripts"]),
            "",
        ],
        [
            "evsys: TrainingLoop -> RedisStreamSink -> RedisStreamSource (group) -> bus",
            fmt(med(rates["evsys"])),
            spread(rates["evsys"]),
            f"{med(ratios['raw']):.2f} ({spread(ratios['raw'])}) / "
            f"{med(ratios['scripts']):.2f} ({spread(ratios['scripts'])})",
        ],
    ]
    print_table(
        ["case", "events/s (median)", "spread", "evsys vs raw / vs raw+scripts (per round)"],
        rows,
        title="Loop to consumer group through Redis",
    )


if __name__ == "__main__":
    run_main(main)
