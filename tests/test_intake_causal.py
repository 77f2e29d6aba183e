"""Cross-thread order: what a thread published before the loop's own publish is
numbered first, so a thread that publishes and then waits for the loop (a
``def`` step at its boundary) never sees its event numbered after the loop's."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import evsys_async as ev
from evsys_async.events import Event

pytestmark = pytest.mark.anyio


class CausalMsg(Event, kw_only=True):
    source: str
    i: int


async def test_a_threads_publish_before_the_loops_is_numbered_first() -> None:
    got: list[Any] = []

    async def record(env: ev.Envelope) -> None:
        got.append(env)

    with anyio.fail_after(10):
        async with ev.EventBus() as bus:
            bus.subscribe(record, events=(CausalMsg,), envelopes=True)
            for i in range(200):
                published = threading.Event()

                def from_thread(i: int = i, done: threading.Event = published) -> None:
                    bus.publish(CausalMsg(source="thread", i=i))
                    done.set()

                threading.Thread(target=from_thread).start()
                # block the loop itself (as a step boundary does): the thread's wake
                # callback cannot run before the loop's own publish below
                published.wait(10)
                bus.publish(CausalMsg(source="loop", i=i))  # happens after the thread's
                await anyio.lowlevel.checkpoint()
            assert (await bus.drain()).ok
    sources = [e.event.source for e in sorted(got, key=lambda e: e.seq)]
    assert sources == ["thread", "loop"] * 200
