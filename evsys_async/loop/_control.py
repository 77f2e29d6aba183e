"""RunControl: a loop's stop, cancel and subscribers, from any thread, around its runs.

A service stops or cancels a run from outside its hooks (a ``DELETE``), from
its own event loop or a thread, while the run may be starting, running, or
already over. :class:`RunControl` is the one place that knows which: the
facade (``_loop.py``) forwards ``request_stop``, ``cancel`` and ``subscribe``
here, and each run :meth:`attaches <RunControl.attach>` itself while it runs
(docs/design.md, "Cancellation and interrupts"):

* before the loop's first run, and from the call of ``run()`` until the run
  attaches, a stop or a cancel is kept and handed to that run when it starts
  (a stop then ends it after its first step, a cancel before it);
* while a run is attached, a stop goes to its state (thread-safe); a cancel,
  a new subscriber, a closed one and a publish go to its event loop, in the
  order they were asked, through one queue its waker empties (never waiting
  for it): so a service that subscribes, then publishes, gets its own event;
* after a run has ended, and until another starts, a stop or a cancel does
  nothing.

Subscribers stay with the loop until they are closed: each run subscribes
every one it finds here (docs/guide.md, "Stopping, cancelling and following a
run"). :class:`RunHandle` is the part of ``TrainingLoop`` a service calls:
``subscribe``, ``request_stop``, ``cancel``, ``publish``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .._util.aio import LoopWaker
from .._util.log import get_logger
from ..bus._subscribe import Isolation, SubscribeOptions
from ..events import Event
from ..policies import Policy
from ._subscribers import LoopSubscription, home_token

__all__ = ["ActiveRun", "Cancel", "RunControl", "RunHandle"]

_log = get_logger()


@dataclass(frozen=True, slots=True)
class Cancel:
    """A request to end a run now: why, and how long a ``def`` step in flight is
    waited for before its thread is abandoned."""

    reason: str | None
    grace: float


class ActiveRun(Protocol):
    """What the control reaches of a run while it is attached. The methods but
    :meth:`request_stop` run on the run's event loop (through ``waker``)."""

    @property
    def waker(self) -> LoopWaker: ...

    def request_stop(self, reason: str | None) -> None:
        """Any thread: end after the current step."""
        ...

    def cancel_now(self, cancel: Cancel) -> None: ...

    def publish(self, event: Event) -> int | None: ...

    def add_subscriber(self, handle: LoopSubscription) -> None: ...

    def drop_subscriber(self, handle: LoopSubscription) -> None: ...


class RunControl:
    """One loop's control (see the module docstring). Every method is thread-safe and
    never blocks beyond a lock held for a few attribute writes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: ActiveRun | None = None
        #: a run of this loop has ended: requests with no run now do nothing
        self._ended = False
        self._stop: tuple[str | None] | None = None
        self._cancel: Cancel | None = None
        self._subscribers: list[LoopSubscription] = []
        #: what was asked of the attached run, in order, for its event loop
        self._ops: deque[Callable[[ActiveRun], object]] = deque()

    # -- any thread ------------------------------------------------------------------

    def request_stop(self, reason: str | None) -> bool:
        """Stop the run in progress after its current step (or the first run, after its
        first step). ``False`` when there is no run to stop."""
        with self._lock:
            run = self._run
            if run is None:
                if self._ended:
                    return False
                if self._stop is None:  # the first request wins, as state.request_stop
                    self._stop = (reason,)
                return True
        run.request_stop(reason)
        return True

    def cancel(self, cancel: Cancel) -> bool:
        """End the run in progress now (or the first run, before its first step).
        ``False`` when there is no run to cancel."""
        with self._lock:
            if self._run is None:
                if self._ended:
                    return False
                self._cancel = self._cancel or cancel
                return True
        return self._post(lambda run: run.cancel_now(cancel))

    def publish(self, event: Event) -> bool:
        """Publish on the run in progress's bus, after what was asked before; ``False``
        (nothing published) without one."""
        return self._post(lambda run: run.publish(event))

    def subscribe(self, handle: LoopSubscription) -> None:
        """Add a subscriber: every run from now on, the one in progress at once."""
        with self._lock:
            self._subscribers.append(handle)
        self._post(lambda run: run.add_subscriber(handle))

    def unsubscribe(self, handle: LoopSubscription) -> None:
        """No more runs for ``handle``; the run in progress ends its subscription."""
        with self._lock:
            if handle in self._subscribers:
                self._subscribers.remove(handle)
        self._post(lambda run: run.drop_subscriber(handle))

    def _post(self, op: Callable[[ActiveRun], object]) -> bool:
        """Queue ``op`` for the attached run's event loop; ``False`` without a run."""
        with self._lock:
            run = self._run
            if run is None:
                return False
            self._ops.append(op)
        run.waker.soon(self._run_ops)  # one call empties the queue (trio dedupes it)
        return True

    def _run_ops(self) -> None:
        """On the run's event loop: what was asked, in order. Never raises."""
        while True:
            with self._lock:
                run = self._run
                if run is None or not self._ops:
                    return
                op = self._ops.popleft()
            try:
                op(run)
            except Exception as exc:  # a bug: the loop's callback must not raise
                _log.warning("loop control request failed", error=repr(exc))

    # -- the run's event loop ------------------------------------------------------------

    def begin(self) -> None:
        """``run()`` was called: requests from now on are for this run, kept until it
        attaches."""
        with self._lock:
            self._ended = False

    def attach(self, run: ActiveRun) -> tuple[Cancel | None, list[LoopSubscription]]:
        """``run`` starts: it receives what was asked before it (a stop, applied here)
        and returns the cancel to apply and the subscribers to subscribe."""
        with self._lock:
            self._run = run
            stop, self._stop = self._stop, None
            cancel, self._cancel = self._cancel, None
            subscribers = list(self._subscribers)
        if stop is not None:
            run.request_stop(stop[0])
        return cancel, subscribers

    def detach(self) -> None:
        """The run has ended (its shutdown is over): requests do nothing until the next."""
        with self._lock:
            self._run = None
            self._ended = True
            self._stop = self._cancel = None  # asked of a run that never attached
            self._ops.clear()


class RunHandle:
    """What a service calls on a ``TrainingLoop``, from any thread or event loop: a
    base of the facade, over its :class:`RunControl` (``_control``)."""

    _control: RunControl

    def subscribe(
        self,
        handler: Callable[[Any], Any],
        *,
        events: Sequence[type[Event]] = (Event,),
        policy: Policy | None = None,
        name: str | None = None,
        timeout: float | None = None,
        envelopes: bool = False,
        isolation: Isolation | None = None,
        sync: bool | None = None,
        on_start: Callable[[], Any] | None = None,
        on_batch_end: Callable[[], Any] | None = None,
        on_close: Callable[[], Any] | None = None,
        hook_name: Callable[[Event | str], str] | None = None,
        on_request: Callable[[bytes], None] | None = None,
    ) -> LoopSubscription:
        """Subscribe ``handler`` to this loop's runs: each run subscribes it on its bus
        with the run key it claimed, before its first event, and ends it after the
        drain, so it sees exactly that run, ``TrainStarted`` to ``TrainEnded``.

        The options are :meth:`EventBus.subscribe`'s, but ``run_key`` (the run's).
        Called while a run is in progress, it joins that run at once (after its
        ``TrainEnded``, the next). With ``run(own_thread=True)`` an ``async def``
        handler subscribed from an event loop runs on that loop. Any thread; never
        blocks. Returns a :class:`LoopSubscription` (``close()`` leaves the runs;
        ``subscription``, ``stats()``). Raises as :meth:`EventBus.subscribe` does
        for a bad handler or option, here.
        """
        options = SubscribeOptions(
            events=tuple(events),
            policy=policy,
            name=name,
            timeout=timeout,
            envelopes=envelopes,
            isolation=isolation,
            sync=sync,
            on_start=on_start,
            on_batch_end=on_batch_end,
            on_close=on_close,
            hook_name=hook_name,
            on_request=on_request,
        )
        control = self._control
        handle = LoopSubscription(handler, options, home=home_token(), close=control.unsubscribe)
        control.subscribe(handle)
        return handle

    def request_stop(self, reason: str | None = None) -> None:
        """End the run after its current step, status ``stopped``, as
        ``state.request_stop`` from a hook does; the first request wins its reason.

        Any thread, never blocks. Before the loop's first run (and from the call of
        ``run()`` on) it is kept for that run, which then ends after its first step;
        after a run ended, until the next ``run()``, it does nothing.
        """
        self._control.request_stop(reason)

    def cancel(self, reason: str | None = None, *, grace: float = 5.0) -> None:
        """End the run now, even with a step in flight; status ``cancelled`` and
        ``stop_reason=reason``, through the one shutdown (files complete,
        ``TrainEnded``, manifest). ``run()`` then returns the artifacts.

        An ``async def`` step is cancelled at its next await. A ``def`` step cannot
        be: it is waited for ``grace`` seconds (bounded by ``drain_timeout``), then
        its thread is abandoned (a daemon: its late result is dropped, and no
        ``interrupted`` checkpoint is saved while it may still change the model).
        Any thread or event loop, never blocks. Kept and applied as
        :meth:`request_stop` is (before the first run: the run ends before its first
        step); after a run ended it does nothing. Raises ``ValueError`` for a
        negative ``grace``.
        """
        if grace < 0:
            raise ValueError(f"TrainingLoop.cancel(grace=...) must be >= 0 seconds, got {grace}")
        self._control.cancel(Cancel(reason, grace))

    def publish(self, event: Event) -> None:
        """Publish ``event`` on the run's bus, stamped with its run key and rank, as
        ``state.publish`` does, after whatever was asked of the run before it from
        this thread (a ``subscribe`` first sees it). Any thread, never blocks;
        outside a run, a no-op."""
        self._control.publish(event)
