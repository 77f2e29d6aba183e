"""The event bus: publish typed events; every subscriber handles them in its own task,
thread or process.

``EventBus`` is the facade (``_bus.py``); behind it the intake (``_intake.py``),
the routes (``_routing.py``), the pump (``_pump.py``) and the deliveries
(``_delivery/``: a task, a thread, or a child process and the wire to it).
``docs/design.md`` has the whole path of an event. The bus knows events, not
training: it imports nothing of the loop or the callbacks.

In a subscriber's own process (``isolation="process"``),
:func:`request_parent` sends bytes to the subscriber's ``on_request`` in the
parent, and :func:`in_subscriber_process` tells that process apart.
"""

from __future__ import annotations

from ._bus import EventBus
from ._delivery.child import in_subscriber_process, request_parent
from ._subscribe import Isolation
from .subscription import DrainReport, SubscriberStats, Subscription

__all__ = [
    "DrainReport",
    "EventBus",
    "Isolation",
    "SubscriberStats",
    "Subscription",
    "in_subscriber_process",
    "request_parent",
]
