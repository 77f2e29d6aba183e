"""Property-based tests of the bus: order and no loss under random interleavings.

Each example builds a bus with random subscribers (``def`` or ``async def``,
slow by a random number of checkpoints, failing on some events), publishes from
the loop (with random yields in between) and from several threads at once,
drains, and checks that every ``Lossless`` subscriber saw every event exactly
once, in sequence order, each publisher's events in its own order, whatever
failed; and that bounded subscribers stay within their bound and account for
every event as delivered or dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import anyio
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evsys_async as ev
from evsys_async.events import CallbackFailed, Envelope, Event

pytestmark = pytest.mark.anyio

WAIT = 20.0

SETTINGS = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class PropMsg(Event):
    source: str
    i: int


@dataclass
class SubSpec:
    kind: str  # "async" | "def"
    fail_every: int  # 0: never; else fails on events with i % fail_every == 0
    pauses: list[int]  # checkpoints awaited per event, cycled (async only)
    policy: str  # "lossless" | "drop_oldest" | "latest"


sub_specs = st.builds(
    SubSpec,
    kind=st.sampled_from(["async", "def"]),
    fail_every=st.integers(min_value=0, max_value=4),
    pauses=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=5),
    policy=st.sampled_from(["lossless", "lossless", "drop_oldest", "latest"]),
)

# a loop-side plan: publish n events, then await k checkpoints
loop_plan = st.lists(
    st.tuples(st.integers(min_value=0, max_value=12), st.integers(min_value=0, max_value=3)),
    max_size=12,
)


class Handler:
    def __init__(self, spec: SubSpec) -> None:
        self.spec = spec
        self.items: list[Envelope] = []
        self.failed = 0

    def _record(self, env: Envelope) -> None:
        self.items.append(env)
        event = env.event
        assert isinstance(event, PropMsg)
        if self.spec.fail_every and event.i % self.spec.fail_every == 0:
            self.failed += 1
            raise RuntimeError(f"planned failure on {event.source}:{event.i}")

    async def handle_async(self, env: Envelope) -> None:
        for _ in range(self.spec.pauses[len(self.items) % len(self.spec.pauses)]):
            await checkpoint()
        self._record(env)

    def handle_def(self, env: Envelope) -> None:
        self._record(env)


def _policy(name: str) -> ev.Policy:
    if name == "drop_oldest":
        return ev.DropOldest(5)
    if name == "latest":
        return ev.Latest(max_kept=5)
    return ev.Lossless()


def _check_in_order(items: list[Envelope], expected: dict[str, int], *, lossless: bool) -> None:
    seqs = [e.seq for e in items]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), "out of order or duplicated"
    per_source: dict[str, list[int]] = {}
    for env in items:
        assert isinstance(env.event, PropMsg)
        per_source.setdefault(env.event.source, []).append(env.event.i)
    for source, got in per_source.items():
        assert got == sorted(got), f"{source}: out of order"
    if lossless:
        assert per_source == {s: list(range(n)) for s, n in expected.items() if n}


@SETTINGS
@given(
    specs=st.lists(sub_specs, min_size=1, max_size=4),
    plan=loop_plan,
    thread_counts=st.lists(st.integers(min_value=0, max_value=60), max_size=3),
    batch_size=st.integers(min_value=1, max_value=40),
    batch_delay=st.sampled_from([0.0, 0.001, 0.005]),
)
async def test_order_and_no_loss_under_random_interleavings(
    specs: list[SubSpec],
    plan: list[tuple[int, int]],
    thread_counts: list[int],
    batch_size: int,
    batch_delay: float,
) -> None:
    expected = {"loop": sum(n for n, _ in plan)}
    expected.update({f"t{k}": n for k, n in enumerate(thread_counts)})
    total = sum(expected.values())
    handlers = [Handler(spec) for spec in specs]
    everything: list[Envelope] = []

    async def watch_all(env: Envelope) -> None:
        everything.append(env)

    start = threading.Barrier(len(thread_counts) + 1)

    def worker(name: str, n: int) -> None:
        start.wait(WAIT)
        for i in range(n):
            bus.publish(PropMsg(source=name, i=i))

    with anyio.fail_after(WAIT):
        async with ev.EventBus(batch_size=batch_size, batch_delay=batch_delay) as bus:
            subs = []
            for k, h in enumerate(handlers):
                fn = h.handle_async if h.spec.kind == "async" else h.handle_def
                subs.append(
                    bus.subscribe(
                        fn,
                        events=(PropMsg,),
                        envelopes=True,
                        name=f"s{k}",
                        policy=_policy(h.spec.policy),
                    )
                )
            bus.subscribe(watch_all, envelopes=True, name="all")
            threads = [
                threading.Thread(target=worker, args=(f"t{k}", n), daemon=True)
                for k, n in enumerate(thread_counts)
            ]
            for t in threads:
                t.start()
            await anyio.to_thread.run_sync(start.wait, WAIT)
            i = 0
            for n, pauses in plan:
                for _ in range(n):
                    bus.publish(PropMsg(source="loop", i=i))
                    i += 1
                for _ in range(pauses):
                    await checkpoint()
            for t in threads:
                await anyio.to_thread.run_sync(t.join, WAIT)
            report = await bus.drain(timeout=WAIT)
            assert report.ok, report
            stats = bus.stats()
    # the catch-all subscriber sees every event, CallbackFailed included, numbered 0..N-1
    assert [e.seq for e in everything] == list(range(len(everything)))
    msgs = [e for e in everything if isinstance(e.event, PropMsg)]
    _check_in_order(msgs, expected, lossless=True)
    # failures are coalesced: each CallbackFailed stands for `count` of them, and the
    # drain told what no summary had, so the counts add up to every failure
    n_failures = sum(e.event.count for e in everything if isinstance(e.event, CallbackFailed))
    assert n_failures == sum(h.failed for h in handlers)
    for k, h in enumerate(handlers):
        st_ = stats[f"s{k}"]
        lossless = h.spec.policy == "lossless"
        _check_in_order(h.items, expected, lossless=lossless)
        assert st_.failed == h.failed
        assert st_.delivered == len(h.items) - h.failed  # a call that raised is not delivered
        # every event counted once: delivered, failed or dropped (nothing pending after drain)
        assert st_.delivered + st_.failed + st_.dropped == total and st_.pending == 0
        if lossless:
            assert st_.dropped == 0 and len(h.items) == total
        else:
            assert st_.max_pending <= 5 + 1  # window (+ one coalesced step for Latest)


@SETTINGS
@given(
    n_events=st.integers(min_value=1, max_value=200),
    publishers=st.integers(min_value=1, max_value=4),
    kind=st.sampled_from(["async", "def"]),
)
async def test_publish_and_wait_barrier_holds_for_every_event(
    n_events: int, publishers: int, kind: str
) -> None:
    # After publish_and_wait(e) returns ok, every matching subscriber has handled e
    # and everything published before it, whoever published that.
    seen: list[int] = []

    async def a(env: Envelope) -> None:
        seen.append(env.seq)

    def d(env: Envelope) -> None:
        seen.append(env.seq)

    def worker(name: str) -> None:
        for i in range(n_events):
            bus.publish(PropMsg(source=name, i=i))

    with anyio.fail_after(WAIT):
        async with ev.EventBus() as bus:
            bus.subscribe(a if kind == "async" else d, envelopes=True)
            threads = [
                threading.Thread(target=worker, args=(f"t{k}",), daemon=True)
                for k in range(publishers)
            ]
            for t in threads:
                t.start()
            for j in range(5):
                barrier_seq = bus.last_seq + 1  # what publish_and_wait's publish gets
                report = await bus.publish_and_wait(PropMsg(source="barrier", i=j), timeout=WAIT)
                assert report.ok
                # everything numbered up to the barrier's own seq was handled
                assert set(range(barrier_seq + 1)) <= set(seen)
            for t in threads:
                await anyio.to_thread.run_sync(t.join, WAIT)
            assert (await bus.drain(timeout=WAIT)).ok
    assert seen == list(range(len(seen)))
    assert len(seen) == publishers * n_events + 5
