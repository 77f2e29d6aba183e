"""``SinkCallback``: an envelope sink (Redis stream, JSON lines) as one of a loop's callbacks.

The sink gets every event of the run as an envelope (``on_envelope``); its
``flush`` runs after each delivered batch and its ``close`` in ``teardown``.
Every rank sends (each event carries its rank). Run configs build these from
their ``transports:`` section (docs/config.md).

Where a sink runs depends on what it says of itself. A sink whose class sets
``nonblocking = True`` (:class:`~evsys_async.transports.RedisStreamSink`: its
``__call__`` only encodes and its ``flush`` hands the batch to its own sender
thread) is fed on the event loop, which costs the loop about a microsecond an
event instead of the hop to a thread (docs/performance.md); its ``close``, which
waits for the sender, runs in a worker thread. Any other sink (a file writer)
runs in the callback's own thread, as a ``def`` callback does.

The callback's class is named after the sink's, so the run's callback report
reads ``RedisStreamSink  ok (212 events)``.
"""

from __future__ import annotations

from .._util.worker import in_daemon_thread
from ..events import Envelope
from ..state import LoopState
from ..transports.base import EnvelopeSink
from .base import Callback

__all__ = ["SinkCallback"]


class SinkCallback(Callback):
    """Feed every event of the run to ``sink`` (callable with an envelope, with
    ``flush()`` and ``close()``), such as :class:`~evsys_async.transports.RedisStreamSink`.

    ``SinkCallback(sink)`` returns an instance of a subclass named after the
    sink's class; ``isinstance(cb, SinkCallback)`` holds. Raises ``TypeError``
    for an object that is not a sink.
    """

    sink: EnvelopeSink

    def __new__(cls, sink: EnvelopeSink) -> SinkCallback:
        if cls is SinkCallback:
            cls = _subclass(type(sink), bool(getattr(sink, "nonblocking", False)))
        return super().__new__(cls)

    def __init__(self, sink: EnvelopeSink) -> None:
        for method in ("flush", "close"):
            if not callable(getattr(sink, method, None)):
                raise TypeError(
                    f"SinkCallback: {sink!r} has no {method}(); a sink is callable with an "
                    "envelope and has flush() and close() (evsys_async.transports.EnvelopeSink)"
                )
        if not callable(sink):
            raise TypeError(f"SinkCallback: {sink!r} is not callable with an envelope")
        self.sink = sink

    def __repr__(self) -> str:
        return f"<SinkCallback {type(self.sink).__name__}>"


class _ThreadSink(SinkCallback):
    """A sink that may block: fed in the callback's own thread."""

    def on_envelope(self, state: LoopState, envelope: Envelope) -> None:
        self.sink(envelope)

    def flush(self) -> None:
        self.sink.flush()

    def teardown(self, state: LoopState) -> None:
        self.sink.close()


class _LoopSink(SinkCallback):
    """A sink that never blocks in ``__call__`` or ``flush``: fed on the event loop."""

    async def on_envelope(self, state: LoopState, envelope: Envelope) -> None:
        self.sink(envelope)

    async def flush(self) -> None:
        self.sink.flush()

    async def teardown(self, state: LoopState) -> None:
        # close waits (up to the sink's close_timeout) for its sender; past the run's
        # shutdown deadline the run goes on without waiting for it
        await in_daemon_thread(self.sink.close, name="evsys-sink:close")


_SUBCLASSES: dict[tuple[type, bool], type[SinkCallback]] = {}


def _subclass(sink_type: type, nonblocking: bool) -> type[SinkCallback]:
    key = (sink_type, nonblocking)
    cls = _SUBCLASSES.get(key)
    if cls is None:
        base = _LoopSink if nonblocking else _ThreadSink
        name = sink_type.__name__
        cls = _SUBCLASSES[key] = type(name, (base,), {"__module__": __name__, "__qualname__": name})
    return cls
