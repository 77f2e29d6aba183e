"""``Sender``: the thread that talks to MLflow for one run of the ``mlflow`` callback.

The callback's hooks and ``flush`` never wait for the tracking server: they
hand metrics and params to :meth:`Sender.put` / :meth:`Sender.set_params`
(a lock, a deque, an event) and go on. The sender's thread creates (or, on a
resume, finds) the experiment, the arm's parent run and the run, then sends
params and metrics in order, 1,000 metrics a ``log_batch`` call.

* A failure that may pass (the server down, a 5xx or 429, a locked SQLite
  database, anything that is not an ``MlflowException``) is retried with
  backoff, 0.5 s doubling to 30 s; meanwhile up to ``max_buffered`` metrics
  wait, in order, and newer ones past that bound are dropped and counted.
* A refusal (an ``MlflowException`` with a 4xx status other than 408 and 429:
  a name or value MLflow rejects, a param whose value changed) drops what was
  refused, counts it and says so once: retrying cannot help.
* :meth:`Sender.finish` ends the run with its status under a deadline; what
  is not confirmed sent by then is counted as not sent. The thread is a
  daemon: a call that hangs (MLflow's own HTTP retries, set by
  ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, run inside each attempt) cannot hold
  the process's exit.

:meth:`Sender.degraded` is what the callback reports. The parent run of an
experiment's arm is found or made once per process (a lock and a cache), and
found again by its tags from another process.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from pathlib import Path
from time import monotonic
from typing import Any

import msgspec

from .._util.log import get_logger
from .._util.rundir import read_claim, record_claim
from ..errors import describe
from ..state import Degraded, LoopState

__all__ = ["Plan", "Point", "Sender"]

_log = get_logger()

#: (key, value, timestamp in ms, step): one metric point, as the sender sends it
Point = tuple[str, float, int, int]

_METRICS_PER_CALL, _PARAMS_PER_CALL = 1000, 100
_FIRST_BACKOFF, _MAX_BACKOFF = 0.5, 30.0

#: the parent run of each arm, per (store, experiment, output dir, arm), in this process
_PARENTS: dict[tuple[str, str, str, str], str] = {}
_PARENTS_LOCK = threading.Lock()


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """What the sender finds or makes: the experiment, the run, its tags."""

    experiment: str
    run_name: str
    group: str | None
    tags: dict[str, str]
    output_dir: str
    run_dir: Path
    #: the run's id is kept under this name in the run dir's claims (a resume finds it)
    claim: str
    resume: bool
    #: the experiment's artifact location when the sender makes it (``None``: MLflow's)
    artifacts: str | None


class Sender:
    """One run's link to MLflow (see the module docstring). ``put``, ``set_params``,
    ``degraded`` never block on the server; ``finish`` blocks up to its timeout."""

    def __init__(self, client: Any, plan: Plan, max_buffered: int, state: LoopState) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        self.client, self.plan, self.max_buffered = client, plan, max_buffered
        self._entities: tuple[Any, Any] = (Metric, Param)
        self._refusal: Any = MlflowException
        self._extras = state.ctx.extras
        self._lock = threading.Lock()
        self._wake, self._ending_now, self._done = (threading.Event() for _ in range(3))
        self._buffer: deque[Point] = deque()
        self._params: dict[str, str] = {}
        self._ending: tuple[str, float] | None = None
        self._run_id: str | None = None
        self._parent_id: str | None = None
        #: why the last attempt failed (``None``: it did not), cleared by a success
        self._error: str | None = None
        #: why what is lost was lost
        self._loss_reason: str | None = None
        self._abandoned = False
        self._lost = 0
        self._params_refused = 0
        self._missing_from: int | None = None
        self._thread = threading.Thread(
            target=self._main, name=f"evsys-mlflow:{plan.run_name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    # -- the callback's side -----------------------------------------------------------

    def put(self, points: list[Point]) -> None:
        """Queue ``points`` in order; past ``max_buffered`` the newest are dropped, counted."""
        if not points:
            return
        with self._lock:
            room = max(0, self.max_buffered - len(self._buffer))
            if room < len(points):
                self._lose(points[room:], "more than max_buffered metrics waiting")
                points = points[:room]
            self._buffer.extend(points)
        self._wake.set()

    def set_params(self, params: dict[str, str]) -> None:
        with self._lock:
            self._params.update(params)
        self._wake.set()

    def degraded(self) -> Degraded | None:
        """``None`` while nothing is lost or waiting on a failure; else why, and how much."""
        with self._lock:
            lost, held, error = self._lost, len(self._buffer), self._error
            refused, why = self._params_refused, self._loss_reason
        if lost or refused:
            what = f"{lost} metrics not sent" + (f", {refused} params refused" if refused else "")
            return Degraded(f"{what}: {why}", rows_lost=lost, missing_from_step=self._missing_from)
        if held and error:
            reason = f"tracking server unreachable ({error}); {held} metrics held for a retry"
            return Degraded(reason)
        return None

    def finish(self, status: str, timeout: float) -> Degraded | None:
        """End the run with ``status``: the sender has ``timeout`` seconds to send what
        waits and mark the run ended; what it has not sent then is counted lost."""
        with self._lock:
            self._ending = (status, monotonic() + timeout)
        self._ending_now.set()
        self._wake.set()
        if not self._done.wait(timeout + 1.0):
            _log.warning(
                "mlflow: the sender did not finish in time; abandoned",
                run=self.plan.run_name,
                finish_timeout=timeout,
            )
        with self._lock:
            self._abandoned = True
            left = list(self._buffer)
            self._buffer.clear()
            if left:
                self._lose(left, self._error or f"not sent within finish_timeout={timeout}s")
        return self.degraded()

    # -- the sender's thread -------------------------------------------------------------

    def _main(self) -> None:
        backoff = 0.0
        try:
            while True:
                if backoff:  # finish() cuts the first wait short, not the later ones
                    self._ending_now.wait(backoff)
                    self._ending_now.clear()
                else:
                    self._wake.wait()
                self._wake.clear()
                backoff = self._attempt(backoff)
                with self._lock:
                    ending, empty = self._ending, not self._buffer
                if ending is not None:
                    status, deadline = ending
                    if empty and self._error is None and self._terminate(status):
                        return
                    left = deadline - monotonic()
                    if left <= 0:
                        return
                    backoff = min(backoff or _FIRST_BACKOFF, left)
        finally:
            self._done.set()

    def _attempt(self, backoff: float) -> float:
        """Send what waits; the next backoff (0 after a success)."""
        try:
            self._send()
        except Exception as exc:  # the server, the network, the store: retried
            text = describe(exc)
            if self._error is None:
                _log.warning(
                    "mlflow: tracking server unreachable; retrying with backoff",
                    run=self.plan.run_name,
                    error=text,
                )
            self._error = text
            return min(max(_FIRST_BACKOFF, backoff * 2), _MAX_BACKOFF)
        if self._error is not None:
            _log.info("mlflow: tracking server reachable again", run=self.plan.run_name)
            self._error = None
        return 0.0

    def _send(self) -> None:
        run_id = self._run_id or self._open_run()
        metric_cls, param_cls = self._entities
        with self._lock:
            params = list(self._params.items())
        for i in range(0, len(params), _PARAMS_PER_CALL):
            part = params[i : i + _PARAMS_PER_CALL]
            refused = self._call(run_id, "params", params=[param_cls(k, v) for k, v in part])
            with self._lock:
                for k, v in part:
                    if self._params.get(k) == v:
                        del self._params[k]
                if refused:
                    self._params_refused += len(part)
                    self._loss_reason = self._loss_reason or refused
        while True:
            with self._lock:
                chunk = list(itertools.islice(self._buffer, _METRICS_PER_CALL))
            if not chunk:
                return
            metrics = [metric_cls(k, v, ts, step) for k, v, ts, step in chunk]
            refused = self._call(run_id, f"{len(chunk)} metrics", metrics=metrics)
            with self._lock:
                if self._abandoned:  # finish counted them already
                    return
                for _ in chunk:
                    self._buffer.popleft()
                if refused:
                    self._lose(chunk, refused)

    def _call(self, run_id: str, what: str, **batch: Any) -> str | None:
        """``log_batch``; a refusal's text (what was refused is dropped, not retried),
        else ``None``. Anything that may pass propagates, to be retried."""
        try:
            self.client.log_batch(run_id, synchronous=True, **batch)
        except self._refusal as exc:
            code = exc.get_http_status_code()
            if not 400 <= code < 500 or code in (408, 429):
                raise
            text = describe(exc)
            _log.warning(
                "mlflow refused a batch; it is dropped",
                run=self.plan.run_name,
                what=what,
                error=text,
            )
            return text
        return None

    def _open_run(self) -> str:
        client, plan = self.client, self.plan
        experiment_id = self._experiment_id()
        run_id = read_claim(plan.run_dir, plan.claim) if plan.resume else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            tags = dict(plan.tags)
            if plan.group:
                self._parent_id = _parent_run(client, plan, experiment_id)
                tags["mlflow.parentRunId"] = self._parent_id
            run = client.create_run(experiment_id, run_name=plan.run_name, tags=tags)
            run_id = str(run.info.run_id)
            record_claim(plan.run_dir, plan.claim, run_id)
        self._extras["mlflow_run_id"] = run_id
        self._run_id = run_id
        return run_id

    def _experiment_id(self) -> str:
        client, name = self.client, self.plan.experiment
        found = client.get_experiment_by_name(name)
        if found is None:
            try:
                return str(client.create_experiment(name, artifact_location=self.plan.artifacts))
            except self._refusal:  # made meanwhile by another run
                found = client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise RuntimeError(
                f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                "or give the callback another experiment"
            )
        return str(found.experiment_id)

    def _terminate(self, status: str) -> bool:
        """Mark the run (and its arm's parent run) ended; ``False`` to retry."""
        try:
            if self._run_id is None:  # nothing was ever sent: make the run, so it shows
                self._send()
            self.client.set_terminated(self._run_id, status)
            if self._parent_id is not None:
                self.client.set_terminated(self._parent_id, "FINISHED")
        except Exception as exc:
            self._error = describe(exc)
            return False
        return True

    def _lose(self, points: list[Point], why: str) -> None:
        """Count ``points`` as not sent (the lock is held)."""
        self._lost += len(points)
        self._loss_reason = self._loss_reason or why
        first = min(p[3] for p in points)
        if self._missing_from is None or first < self._missing_from:
            self._missing_from = first


def _parent_run(client: Any, plan: Plan, experiment_id: str) -> str:
    """The arm's parent run: made once per experiment directory and arm, and found
    again by its tags (from another process, or this one's cache)."""
    group = str(plan.group)
    key = (plan.claim, experiment_id, plan.output_dir, group)
    with _PARENTS_LOCK:
        found = _PARENTS.get(key)
        if found is not None:
            return found
        wanted = f"tags.`evsys.parent` = 'true' and tags.`evsys.group` = '{group}'"
        runs = client.search_runs([experiment_id], filter_string=wanted)
        mine = [r for r in runs if r.data.tags.get("evsys.output_dir") == plan.output_dir]
        if mine:
            found = str(mine[0].info.run_id)
        else:
            tags = {"evsys.parent": "true", "evsys.group": group}
            tags["evsys.output_dir"] = plan.output_dir
            version = plan.tags.get("evsys.version")
            if version:
                tags["evsys.version"] = version
            found = str(client.create_run(experiment_id, run_name=group, tags=tags).info.run_id)
        _PARENTS[key] = found
        return found
