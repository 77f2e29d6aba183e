"""Training inside a long-lived async service: start runs over HTTP, watch them live.

A Starlette app whose lifespan owns the runs' task group:

    POST   /runs                {"run_key", "step", "num_steps", "params", "callbacks"}
    GET    /runs                every run and its status
    GET    /runs/{key}          one run
    GET    /runs/{key}/events   the run's events, live, as server-sent events
    DELETE /runs/{key}          stop the run after its current step; cancel it if it
                                has not stopped within ``stop_grace`` (``?force=true``:
                                cancel it now, even with a step in flight)

Each run trains on an event loop of its own (``await loop.run(own_thread=True)``,
a thread the loop owns), so no amount of HTTP traffic, slow clients or work in
the handlers on the service's event loop slows its steps. The service follows
a run with one subscriber (``loop.subscribe``, ``DropOldest``), subscribed
before the run starts under the key ``loop.claim()`` took: it keeps the run's
recent events as SSE frames, each encoded once, and every client of the run
streams from that one history at its own pace. A client is woken at most
once per batch of events and writes what it has not sent in one piece; a
stalled client waits in its socket write and costs nothing more until it
reads again (if it fell behind the history, it loses its oldest events: the
ids show where).

Everything a request says is untrusted: it may only pick a step the service
registered (``STEPS``, each with the params it accepts, checked) and callback
kinds the service allows; run keys are printable names (letters, digits and
``-_.``) that must resolve inside the output dir, as must any path in a
callback's params; an import path such as ``"step": "os:system"`` is refused
(400) before anything is imported; a body over ``max_body`` is refused while
it streams in (413), never read whole. Run keys are taken once (409).

At shutdown (or the first SIGINT/SIGTERM) running loops are cancelled and end
through their shutdown sequence (files complete, ``TrainEnded(status=
"cancelled")`` delivered, so the streams end), the server drains its
connections, the runs are summed up and the process exits 130 (SIGINT) or
143 (SIGTERM), as the ``evsys-async`` CLI does; a second signal exits at once.

    pip install 'evsys-async[http]' starlette uvicorn hypercorn trio
    python examples/service.py                   # asyncio + Uvicorn, 127.0.0.1:8000
    python examples/service.py --backend trio    # trio + Hypercorn
    curl -X POST localhost:8000/runs -d '{"run_key": "a", "step": "toy", "num_steps": 100}'
    curl -N localhost:8000/runs/a/events

Binds to 127.0.0.1 by default: put authentication in front before exposing it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import anyio
import anyio.abc
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import evsys_async as ev
from evsys_async.events import Envelope, Event
from evsys_async.loop import LoopSubscription, StepFn

_log = logging.getLogger("evsys_service")

# -- what a request may pick ----------------------------------------------------------


class ToyParams(msgspec.Struct, forbid_unknown_fields=True):
    """The toy step's params: ``delay`` seconds a step, bounded (a stop always lands)."""

    delay: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.01


async def toy_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    """A stand-in for real work: ``params.delay`` seconds a step (default 10 ms)."""
    await anyio.sleep(float(state.ctx.run_config.get("delay", 0.01)))
    return {"loss": 1.0 / math.sqrt(step_idx + 1)}


#: The steps a request may name. Nothing else is ever imported or called.
STEPS: dict[str, StepFn] = {"toy": toy_step}
#: The params each step accepts, checked before its run starts (a step without an
#: entry takes any scalar params as given).
STEP_PARAMS: dict[str, type[msgspec.Struct]] = {"toy": ToyParams}
#: The callback kinds a request may add (``local_logger`` is always there).
CALLBACKS = ("csv_metrics", "early_stopping", "print_progress")
#: Params that name a file or directory: each must resolve inside the output dir.
PATH_PARAMS = ("out_path", "log_dir", "path", "dir", "root")
#: What a run key may hold besides Unicode letters and digits.
KEY_PUNCTUATION = "-_."


class RunStatus(StrEnum):
    """A run's status; a ``StrEnum`` so ``status == "completed"`` holds."""

    RUNNING = "running"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"
    CANCELLED = "cancelled"


class CallbackRequest(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    params: dict[str, Any] = msgspec.field(default_factory=dict)


class RunRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    run_key: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    step: str
    num_steps: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)]
    params: dict[str, float | int | str | bool] = msgspec.field(default_factory=dict)
    callbacks: list[CallbackRequest] = msgspec.field(default_factory=list)


class BadRequest(Exception):
    """A request the service refuses: the HTTP status and a message that names the fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# -- a run's events, for its clients ----------------------------------------------------


class Feed:
    """A run's events as SSE frames, for every client of the run: the last ``size``,
    each encoded once, and one wake-up of the waiting clients per batch.

    The run's one subscriber (``loop.subscribe``) calls :meth:`record` in a
    thread of its own (never on the run's event loop: the encoding costs the
    steps nothing), and :meth:`publish`/:meth:`close` as its ``on_batch_end``
    and ``on_close`` hooks: they are ``async def``, so ``loop.subscribe`` calls
    them on the service's event loop, which alone touches the frames.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.frames: list[bytes] = []
        self.first = 0  # the run's index of frames[0] (the older ones are gone)
        self.ended = False  # the run's subscription has ended: no frame will follow
        self.closed = anyio.Event()
        self.batches = 0  # wake-ups of the service's loop for this run
        self._changed = anyio.Event()
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._chunk: tuple[int, int, bytes, int] = (0, 0, b"", 0)

    @property
    def end(self) -> int:
        """The run's index of the next frame."""
        return self.first + len(self.frames)

    def record(self, envelope: Envelope) -> None:
        """The subscriber's handler (its own thread): one frame, encoded once."""
        frame = _frame(envelope)
        with self._lock:
            self._pending.append(frame)

    async def publish(self) -> None:
        """``on_batch_end`` (the service's loop): the batch's frames in, clients woken."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        self.frames += batch
        excess = len(self.frames) - self.size
        if excess > max(64, self.size // 4):  # trimmed now and then, not per event
            del self.frames[:excess]
            self.first += excess
        self.batches += 1
        self._wake()

    async def close(self) -> None:
        """``on_close`` (the service's loop): the run's last events are in."""
        await self.publish()
        self.finish()

    def finish(self) -> None:
        self.ended = True
        self._wake()
        self.closed.set()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def changed(self) -> None:
        """Wait for the next batch (or the end)."""
        await self._changed.wait()

    def since(self, cursor: int, limit: int) -> tuple[int, bytes]:
        """The frames from ``cursor`` (or the oldest kept) on, as one piece of about
        ``limit`` bytes at most (at least one frame), and the index after them.
        Clients at the same place share the piece."""
        start = max(cursor, self.first)
        if start >= self.end:
            return start, b""
        if self._chunk[0] != start or (self._chunk[1] < self.end and self._chunk[3] < limit):
            frames, size, i = [], 0, start - self.first
            while i < len(self.frames) and (not frames or size + len(self.frames[i]) <= limit):
                frames.append(self.frames[i])
                size += len(self.frames[i])
                i += 1
            self._chunk = (start, self.first + i, b"".join(frames), size)
        return self._chunk[1], self._chunk[2]


class Stream:
    """One SSE client of a run: where it is in the run's feed, and what it lost."""

    def __init__(self, feed: Feed, flush_every: float = 0.0, max_write: int = 64 * 1024) -> None:
        self.feed = feed
        self.flush_every = flush_every
        self.max_write = max_write
        self.sent = 0  # events written to the client
        self.dropped = 0  # events that left the history before the client took them
        self.writes = 0  # wake-ups that wrote something
        self._frames: AsyncGenerator[bytes, None] | None = None

    def frames(self) -> AsyncGenerator[bytes, None]:
        self._frames = self._generate()
        return self._frames

    async def _generate(self) -> AsyncGenerator[bytes, None]:
        feed, cursor = self.feed, self.feed.first
        while True:
            if cursor < feed.first:
                self.dropped += feed.first - cursor
                cursor = feed.first
            end, chunk = feed.since(cursor, self.max_write)
            if chunk:
                self.sent += end - cursor
                self.writes += 1
                cursor = end
                # waits while the client's socket is full: no wake-ups meanwhile, and at
                # most max_write bytes of it held beside the kernel's send buffer
                yield chunk
                if cursor == feed.end and self.flush_every > 0:
                    await anyio.sleep(self.flush_every)  # what comes meanwhile: one write
            elif feed.ended:
                return
            else:
                await feed.changed()

    async def aclose(self) -> None:
        if self._frames is not None:
            with anyio.CancelScope(shield=True):
                await self._frames.aclose()


def _frame(envelope: Envelope) -> bytes:
    event: Event = envelope.event
    data = ev.events.encode(event).decode()
    return f"id: {envelope.seq}\r\nevent: {type(event).__name__}\r\ndata: {data}\r\n\r\n".encode()


# -- the service ----------------------------------------------------------------------


@dataclass
class Run:
    key: str
    loop: ev.TrainingLoop
    feed: Feed
    follower: LoopSubscription
    done: anyio.Event = field(default_factory=anyio.Event)
    status: RunStatus = RunStatus.RUNNING
    stopping: bool = False  # a DELETE asked it to stop

    def describe(self) -> dict[str, Any]:
        artifacts = self.loop.artifacts
        return {
            "run_key": self.key,
            "status": self.status,
            "steps_completed": artifacts.steps_completed if artifacts else 0,
            "num_steps": self.loop.num_steps,
            "stop_reason": artifacts.stop_reason if artifacts else None,
            "events": f"/runs/{quote(self.key, safe='')}/events",
        }


class Service:
    """The runs of one process, each on an event loop of its own, started in the
    lifespan's task group."""

    def __init__(
        self,
        output_dir: str | Path = "runs",
        *,
        steps: Mapping[str, StepFn] = STEPS,
        step_params: Mapping[str, type[msgspec.Struct]] = STEP_PARAMS,
        callbacks: Sequence[str] = CALLBACKS,
        history: int = 10_000,
        backlog: int = 10_000,
        keep_finished: int = 100,
        stream_grace: float = 10.0,
        max_body: int = 64 * 1024,
        stop_grace: float = 10.0,
        cancel_grace: float = 5.0,
        flush_every: float = 0.1,
        send_buffer: int = 16 * 1024,
    ) -> None:
        self.output_dir = Path(output_dir).resolve()
        self.steps = dict(steps)
        self.step_params = dict(step_params)
        self.callbacks = tuple(callbacks)
        self.history = history  # events kept per run, for every client
        self.backlog = backlog  # events the run's follower may have waiting, then drops
        self.keep_finished = keep_finished  # ended runs kept (with their history)
        self.stream_grace = stream_grace  # at shutdown, how long a stream may finish
        self.max_body = max_body
        self.stop_grace = stop_grace  # DELETE: how long a run may take to stop
        self.cancel_grace = cancel_grace  # a cancelled def step's thread: then abandoned
        self.flush_every = flush_every  # a client writes at most this often
        self.send_buffer = send_buffer  # a connection's kernel send buffer (SO_SNDBUF)
        self.runs: dict[str, Run] = {}
        self.tg: Any = None
        self.accepting = False

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Own the runs' task group for the app's life."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        async with anyio.create_task_group() as tg:
            self.tg, self.accepting = tg, True
            try:
                yield
            finally:
                # the server normally did this when its shutdown began (see serve())
                with anyio.CancelScope(shield=True):
                    await self.cancel_runs()

    async def cancel_runs(self, reason: str = "the service is shutting down") -> None:
        """Refuse new runs, cancel the running ones and wait until each has ended
        through its shutdown sequence (``TrainEnded(status="cancelled")`` published)."""
        self.accepting = False
        running = [run for run in self.runs.values() if not run.done.is_set()]
        for run in running:
            run.loop.cancel(reason, grace=self.cancel_grace)
        for run in running:
            await run.done.wait()

    # -- starting a run ------------------------------------------------------------

    def start(self, body: bytes) -> Run:
        """Check a request, build its loop, follow its events, start it. Raises BadRequest."""
        if not self.accepting or self.tg is None:
            raise BadRequest("the service is shutting down; try again later", 503)
        try:
            req = msgspec.json.decode(body, type=RunRequest)
        except msgspec.DecodeError as exc:  # ValidationError included: names the field
            raise BadRequest(f"invalid run request: {exc}") from None
        step = self.steps.get(req.step)  # a name from our table: nothing is imported
        if step is None:
            raise BadRequest(
                f"step {req.step!r} is not one this service offers; "
                f"choose one of: {', '.join(sorted(self.steps))}"
            )
        params: dict[str, Any] = dict(req.params)
        schema = self.step_params.get(req.step)
        if schema is not None:
            try:
                params = msgspec.structs.asdict(msgspec.convert(params, schema))
            except msgspec.ValidationError as exc:
                raise BadRequest(f"params of step {req.step!r}: {exc}") from None
        run_dir = self._run_dir(req.run_key)
        if req.run_key in self.runs or run_dir.exists():
            raise BadRequest(f"run key {req.run_key!r} is taken; pick another", 409)
        specs: list[dict[str, Any]] = []
        for i, cb in enumerate(req.callbacks):
            if cb.kind not in self.callbacks:
                raise BadRequest(
                    f"callbacks[{i}].kind: {cb.kind!r} is not allowed here; "
                    f"allowed: {', '.join(self.callbacks)}"
                )
            for name, value in cb.params.items():
                if name in PATH_PARAMS or name.endswith(("_path", "_dir")):
                    self._inside(run_dir, value, f"callbacks[{i}].params.{name}")
            specs.append({"kind": cb.kind, "params": cb.params})
        try:  # the params are checked against each kind's Config: errors name the field
            callbacks = ev.build_callbacks(specs, place="callbacks")
        except ev.ConfigError as exc:
            raise BadRequest(str(exc)) from None
        # the service's own record of every run: events.jsonl, metrics.jsonl, summary.md
        own = {"kind": "local_logger", "params": {"print_every": 0}}
        callbacks.insert(0, ev.build_callbacks([own])[0])
        ctx = ev.LogContext(output_dir=self.output_dir, run_key=req.run_key)
        ctx.run_config = params
        loop = ev.TrainingLoop(
            step,
            num_steps=req.num_steps,
            output_dir=self.output_dir,
            run_key=req.run_key,
            callbacks=callbacks,
            ctx=ctx,
        )
        key = loop.claim()  # the run dir, now: the key every event of the run carries
        feed = Feed(self.history)
        # one subscriber for all the run's clients, from its first event (subscribed
        # before the run starts); a stalled service loop makes it drop its oldest
        follower = loop.subscribe(
            feed.record,
            envelopes=True,
            policy=ev.DropOldest(self.backlog),
            name=f"sse:{key}",
            on_batch_end=feed.publish,
            on_close=feed.close,
        )
        run = Run(key, loop, feed, follower)
        ended = [k for k, r in self.runs.items() if r.done.is_set()]
        for k in ended[: max(0, len(ended) - self.keep_finished + 1)]:
            del self.runs[k]  # the oldest ended runs go first: memory stays bounded
        self.runs[run.key] = run
        self.tg.start_soon(self._execute, run, name=f"run:{run.key}")
        return run

    async def _execute(self, run: Run) -> None:
        try:
            # an event loop of its own: nothing on the service's loop slows the steps
            await run.loop.run(own_thread=True)
        except Exception as exc:  # a failed step: this run only, the others go on
            _log.warning("run %s failed: %s: %s", run.key, type(exc).__name__, exc)
        finally:
            artifacts = run.loop.artifacts
            status = artifacts.status if artifacts is not None else "failed"
            try:
                run.status = RunStatus(status)
            except ValueError:
                run.status = RunStatus.FAILED
            run.follower.close()
            with anyio.CancelScope(shield=True):
                if artifacts is None:  # it never started: nothing will close the feed
                    run.feed.finish()
                with anyio.move_on_after(5.0):
                    await run.feed.closed.wait()  # the clients get the run's TrainEnded
            run.done.set()

    def stop(self, run: Run, *, force: bool) -> None:
        """DELETE: stop after the current step, cancel after ``stop_grace`` if it has not
        stopped; ``force``: cancel now, even with a step in flight."""
        if run.done.is_set():
            return
        if force:
            run.loop.cancel(
                "cancelled through the service (DELETE ?force=true)", grace=self.cancel_grace
            )
            return
        run.loop.request_stop("stopped through the service (DELETE)")
        if not run.stopping:
            run.stopping = True
            self.tg.start_soon(self._cancel_unless_stopped, run)

    async def _cancel_unless_stopped(self, run: Run) -> None:
        with anyio.move_on_after(self.stop_grace):
            await run.done.wait()
        if not run.done.is_set():
            reason = f"did not stop within {self.stop_grace:g} s of a DELETE; cancelled"
            run.loop.cancel(reason, grace=self.cancel_grace)

    def _run_dir(self, key: str) -> Path:
        path = self._inside(self.output_dir, key, "run_key")
        if path.parent != self.output_dir:
            raise BadRequest(f"run_key {key!r} must be one plain name, like 'lr-0.1'")
        bad = next((c for c in key if not (c.isalnum() or c in KEY_PUNCTUATION)), None)
        if bad is not None:
            raise BadRequest(
                f"run_key {key!r}: {bad!r} is not allowed; a run key holds only letters, "
                f"digits and {', '.join(repr(c) for c in KEY_PUNCTUATION)}, like 'lr-0.1'"
            )
        return path

    def _inside(self, base: Path, value: Any, where: str) -> Path:
        """``base / value`` resolved; BadRequest unless it lies inside the output dir."""
        try:
            path = (base / str(value)).resolve()
        except (OSError, ValueError):
            path = None
        if path is None or path == self.output_dir or not path.is_relative_to(self.output_dir):
            raise BadRequest(
                f"{where}: {value!r} leads outside the service's output directory; "
                "use a relative path without '..'"
            )
        return path

    def get(self, key: str) -> Run:
        run = self.runs.get(key)
        if run is None:
            raise BadRequest(f"no run {key!r}; GET /runs lists them", 404)
        return run

    # -- requests ------------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        """The body, up to ``max_body`` bytes: a ``Content-Length`` over it is refused
        before a byte is read, a longer body (chunked) as soon as it passes the limit."""
        limit = self.max_body
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise BadRequest(f"Content-Length {length!r} is not a number of bytes")
            if int(length) > limit:
                raise BadRequest(f"request body of {length} bytes is over {limit} bytes", 413)
        chunks: list[bytes] = []
        size = 0
        async with contextlib.aclosing(request.stream()) as body:
            async for chunk in body:
                size += len(chunk)
                if size > limit:
                    raise BadRequest(f"request body over {limit} bytes (cut while reading)", 413)
                chunks.append(chunk)
        return b"".join(chunks)

    async def open_stream(self, run: Run) -> Stream:
        """A client of ``run``: it gets the run from its oldest kept event on."""
        return Stream(run.feed, self.flush_every)

    def response(self, stream: Stream) -> Any:
        inner = StreamingResponse(
            stream.frames(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        return _Closing(inner, stream.aclose)


class _Closing:
    """An ASGI response that runs ``cleanup`` however the response ends (finished,
    client gone, cancelled)."""

    def __init__(self, response: Any, cleanup: Callable[[], Any]) -> None:
        self.response, self.cleanup = response, cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            await self.cleanup()


# -- the app ----------------------------------------------------------------------------


def create_app(service: Service) -> Starlette:
    def refusing(handler: Callable[..., Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Any:
            try:
                return await handler(request)
            except BadRequest as exc:
                # a refused body is left unread: the connection cannot be reused
                close = {"Connection": "close"} if exc.status == 413 else None
                return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=close)

        return endpoint

    async def start(request: Request) -> Response:
        run = service.start(await service.read_body(request))
        return JSONResponse(run.describe(), status_code=201)

    async def listing(request: Request) -> Response:
        return JSONResponse([run.describe() for run in service.runs.values()])

    async def one(request: Request) -> Response:
        return JSONResponse(service.get(request.path_params["key"]).describe())

    async def stop(request: Request) -> Response:
        run = service.get(request.path_params["key"])
        force = request.query_params.get("force", "false").lower()
        if force not in ("true", "false"):
            raise BadRequest(f"force={force!r}: use ?force=true or leave it out")
        service.stop(run, force=force == "true")
        return JSONResponse(run.describe(), status_code=202)

    async def events(request: Request) -> Any:
        run = service.get(request.path_params["key"])
        return service.response(await service.open_stream(run))

    app = Starlette(
        routes=[
            Route("/runs", refusing(start), methods=["POST"]),
            Route("/runs", refusing(listing), methods=["GET"]),
            Route("/runs/{key}", refusing(one), methods=["GET"]),
            Route("/runs/{key}", refusing(stop), methods=["DELETE"]),
            Route("/runs/{key}/events", refusing(events), methods=["GET"]),
        ],
        lifespan=service.lifespan,
    )
    app.state.service = service
    return app


# -- serving ------------------------------------------------------------------------------


async def serve(
    app: Starlette,
    *,
    backend: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    stop: anyio.Event | None = None,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``stop`` is set; reports the base URL through ``task_status``.
    Signals are the caller's (:func:`serve_until_signal`): the servers install none.

    When the shutdown begins, the service's runs are cancelled first: servers
    wait for open connections before the lifespan's shutdown, and a live event
    stream ends only when its run does (a client that stopped reading holds the
    shutdown up to ``stream_grace``).
    """
    service: Service = app.state.service
    async with anyio.create_task_group() as tg:
        if backend == "asyncio":
            import uvicorn

            class Server(uvicorn.Server):
                async def shutdown(self, sockets: Any = None) -> None:
                    await service.cancel_runs()  # the runs end, so their streams do
                    await super().shutdown(sockets)

                @contextlib.contextmanager
                def capture_signals(self) -> Any:
                    yield  # not Uvicorn's: it re-raises the signal after the shutdown

            sock = _server_socket(host, port, service.send_buffer)
            config = uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                ws="none",
                timeout_graceful_shutdown=math.ceil(service.stream_grace),
            )
            server = Server(config)

            async def watch() -> None:
                if stop is not None:
                    await stop.wait()
                    server.should_exit = True

            tg.start_soon(watch)
            task_status.started(f"http://{host}:{sock.getsockname()[1]}")
            await server.serve([sock])
            tg.cancel_scope.cancel()
        else:
            import hypercorn
            import hypercorn.trio

            async def trigger() -> None:
                if stop is not None:
                    await stop.wait()
                else:
                    await anyio.sleep_forever()
                await service.cancel_runs()  # the runs end, so their streams do

            config = hypercorn.Config()
            config.bind = [f"fd://{_server_socket(host, port, service.send_buffer).detach()}"]
            config.errorlog = None
            config.backlog = 1024
            config.graceful_timeout = service.stream_grace
            binds = await tg.start(
                partial(hypercorn.trio.serve, app, config, shutdown_trigger=trigger)  # type: ignore[arg-type]
            )
            task_status.started(binds[0])


def _server_socket(host: str, port: int, send_buffer: int) -> socket.socket:
    """The listening socket. Each connection inherits its options: TCP_NODELAY (a
    reply's headers and body do not wait 40 ms for the client's delayed ACK) and a
    kernel send buffer of ``send_buffer`` bytes, so a client that stops reading stops
    its stream's writes within that much (the kernel would grow it to megabytes)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


async def serve_until_signal(
    app: Starlette, *, backend: str, host: str = "127.0.0.1", port: int = 8000
) -> int:
    """Serve ``app`` until SIGINT or SIGTERM, as the ``evsys-async`` CLI runs: the first
    signal cancels the runs and shuts down (a second exits at once), then the runs are
    summed up on stdout. Returns the exit code: 0, or 128 + the signal (130, 143)."""
    service: Service = app.state.service
    stop = anyio.Event()
    caught: list[int] = []

    async def on_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if caught:
                    print(f"\nevsys-service: {name} again: exiting now", file=sys.stderr)
                    os._exit(128 + signum)
                caught.append(signum)
                print(
                    f"\nevsys-service: {name} received: cancelling the runs and stopping "
                    "(send it again to exit at once)",
                    file=sys.stderr,
                    flush=True,
                )
                stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(on_signals)
        async with anyio.create_task_group() as serving:
            url = await serving.start(
                partial(serve, app, backend=backend, host=host, port=port, stop=stop)
            )
            print(f"serving on {url} (Ctrl-C to stop)", flush=True)
        tg.cancel_scope.cancel()
    for line in summary(service):
        print(line)
    sys.stdout.flush()
    return 128 + caught[0] if caught else 0


def summary(service: Service) -> list[str]:
    """One line a run, as the CLI's summary: key, status, steps, reason."""
    lines = [f"{len(service.runs)} run(s) in {service.output_dir}"]
    for run in service.runs.values():
        d = run.describe()
        reason = f" ({d['stop_reason']})" if d["stop_reason"] else ""
        lines.append(
            f"  {run.key}: {d['status']} after {d['steps_completed']}/{d['num_steps']} steps"
            + reason
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--output-dir", default="runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(Service(args.output_dir))
    serving = partial(serve_until_signal, app, backend=args.backend, host=args.host, port=args.port)
    sys.exit(anyio.run(serving, backend=args.backend))


if __name__ == "__main__":
    main()
