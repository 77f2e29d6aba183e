"""``evsys_async.subscription``: the public path of what ``EventBus.subscribe`` returns.

The module lives in the bus package (``evsys_async/bus/subscription.py``);
this path stays for code that imports it from here.
"""

from __future__ import annotations

from .bus.subscription import DrainReport, SubscriberStats, Subscription, current_subscription

__all__ = ["DrainReport", "SubscriberStats", "Subscription", "current_subscription"]
