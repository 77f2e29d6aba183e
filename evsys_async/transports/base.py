"""The sink protocol and :func:`attach`, which subscribes a sink to a bus."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from ..bus import EventBus, Subscription
from ..events import Envelope, Event

__all__ = ["EnvelopeSink", "attach"]


@runtime_checkable
class EnvelopeSink(Protocol):
    """Takes envelopes one by one, writes them once per batch.

    ``__call__`` buffers (it runs in the sink's own thread); ``flush`` writes
    the buffer — a failed write keeps it for the next flush, so nothing
    accepted is lost; ``close`` flushes and releases the connection or file.
    A sink class may set ``nonblocking = True`` when neither ``__call__`` nor
    ``flush`` ever waits (``flush`` hands over to a thread of the sink's own):
    ``SinkCallback`` then feeds it on the event loop, without a thread hop.
    """

    def __call__(self, envelope: Envelope) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def attach(
    bus: EventBus,
    sink: EnvelopeSink,
    *,
    events: Iterable[type[Event]] = (Event,),
    run_key: str | None = None,
    name: str | None = None,
) -> Subscription:
    """Subscribe ``sink`` to ``bus`` (lossless, in its own thread); returns the Subscription.

    On the bus's event loop; raises what :meth:`EventBus.subscribe` raises."""
    return bus.subscribe(
        sink,
        events=tuple(events),
        envelopes=True,
        isolation="thread",
        run_key=run_key,
        name=name or type(sink).__name__,
        on_batch_end=sink.flush,
        on_close=sink.close,
    )
