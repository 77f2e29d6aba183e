"""``SinkCallback``: an envelope sink (Redis stream, JSON lines) as one of a loop's callbacks.

The sink gets every event of the run as an envelope, in the callback's own
thread (``on_envelope``); its ``flush`` runs after each delivered batch and
its ``close`` in ``teardown``. Every rank sends (each event carries its
rank). Run configs build these from their ``transports:`` section
(docs/config.md).
"""

from __future__ import annotations

from typing import Any

from ..events import Envelope
from ..state import LoopState
from .base import Callback

__all__ = ["SinkCallback"]


class SinkCallback(Callback):
    """Feed every event of the run to ``sink`` (``__call__(envelope)``, ``flush()``,
    ``close()``), such as :class:`~evsys_async.transports.RedisStreamSink`."""

    def __init__(self, sink: Any) -> None:
        for method in ("flush", "close"):
            if not callable(getattr(sink, method, None)):
                raise TypeError(
                    f"SinkCallback: {sink!r} has no {method}(); a sink is callable with an "
                    "envelope and has flush() and close() (evsys_async.transports.EnvelopeSink)"
                )
        if not callable(sink):
            raise TypeError(f"SinkCallback: {sink!r} is not callable with an envelope")
        self.sink = sink

    def on_envelope(self, state: LoopState, envelope: Envelope) -> None:
        self.sink(envelope)

    def flush(self) -> None:
        self.sink.flush()

    def teardown(self, state: LoopState) -> None:
        self.sink.close()

    def __repr__(self) -> str:
        return f"<SinkCallback {type(self.sink).__name__}>"
