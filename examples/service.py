"""Training inside a long-lived async service: start runs over HTTP, watch them live.

A Starlette app whose lifespan owns one ``EventBus`` and one task group:

    POST   /runs                {"run_key", "step", "num_steps", "params", "callbacks"}
    GET    /runs                every run and its status
    GET    /runs/{key}          one run
    GET    /runs/{key}/events   the run's events, live, as server-sent events
    DELETE /runs/{key}          ask the run to stop after its current step

Everything a request says is untrusted: it may only pick a step the service
registered (``STEPS``) and callback kinds the service allows; a run key and
any path in a callback's params must resolve inside the output dir; an import
path such as ``"step": "os:system"`` is refused (400) before anything is
imported. Run keys are taken once (409).

Each run's events stream from a bus subscriber (``DropOldest``: a slow or
stalled client never slows training): every event has ``id: <seq>``, a client
gets the run from its first event (a bounded history is recorded from before
the run starts) and the stream ends on the run's ``TrainEnded`` or when the
client goes away. When the server's shutdown begins, running loops are
cancelled and end through their shutdown sequence (files complete,
``TrainEnded(status="cancelled")`` delivered, so the streams end), then the
server drains its connections and exits.

    pip install 'evsys-async[http]' starlette uvicorn sse-starlette hypercorn trio
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
import signal
import socket
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import anyio
import anyio.abc
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import evsys_async as ev
from evsys_async.events import Envelope, Event, TrainEnded
from evsys_async.loop import StepFn

_log = logging.getLogger("evsys_service")

# -- what a request may pick ----------------------------------------------------------


async def toy_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    """A stand-in for real work: ``params.delay`` seconds a step (default 10 ms)."""
    await anyio.sleep(float(state.ctx.run_config.get("delay", 0.01)))
    return {"loss": 1.0 / math.sqrt(step_idx + 1)}


#: The steps a request may name. Nothing else is ever imported or called.
STEPS: dict[str, StepFn] = {"toy": toy_step}
#: The callback kinds a request may add (``local_logger`` is always there).
CALLBACKS = ("csv_metrics", "early_stopping", "print_progress")
#: Params that name a file or directory: each must resolve inside the output dir.
PATH_PARAMS = ("out_path", "log_dir", "path", "dir", "root")


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


# -- the service ----------------------------------------------------------------------


@dataclass
class Run:
    key: str
    loop: ev.TrainingLoop
    history: deque[Envelope]
    recorder: ev.Subscription
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    status: RunStatus = RunStatus.RUNNING

    def describe(self) -> dict[str, Any]:
        artifacts = self.loop.artifacts
        return {
            "run_key": self.key,
            "status": self.status,
            "steps_completed": artifacts.steps_completed if artifacts else 0,
            "num_steps": self.loop.num_steps,
            "events": f"/runs/{self.key}/events",
        }


class Service:
    """The runs of one process on one bus, started in the lifespan's task group."""

    def __init__(
        self,
        output_dir: str | Path = "runs",
        *,
        steps: Mapping[str, StepFn] = STEPS,
        callbacks: Sequence[str] = CALLBACKS,
        history: int = 10_000,
        keep_finished: int = 100,
        client_window: int = 1_000,
        stream_grace: float = 10.0,
        max_body: int = 64 * 1024,
    ) -> None:
        self.output_dir = Path(output_dir).resolve()
        self.steps = dict(steps)
        self.callbacks = tuple(callbacks)
        self.history = history  # events kept per run for clients that connect late
        self.keep_finished = keep_finished  # ended runs kept (with their history)
        self.client_window = client_window  # events a slow client may fall behind
        self.stream_grace = stream_grace  # at shutdown, how long a stream may finish
        self.max_body = max_body
        self.runs: dict[str, Run] = {}
        self.bus: ev.EventBus | None = None
        self.tg: Any = None
        self.accepting = False
        self.on_trio = False

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Own the bus and the runs' task group for the app's life."""
        self.on_trio = _on_trio()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        async with ev.EventBus() as bus, anyio.create_task_group() as tg:
            self.bus, self.tg, self.accepting = bus, tg, True
            try:
                yield
            finally:
                # the server normally did this when its shutdown began (see serve())
                with anyio.CancelScope(shield=True):
                    await self.cancel_runs()

    async def cancel_runs(self) -> None:
        """Refuse new runs, cancel the running ones and wait until each has ended
        through its shutdown sequence (``TrainEnded(status="cancelled")`` published)."""
        self.accepting = False
        running = [run for run in self.runs.values() if not run.done.is_set()]
        for run in running:
            run.scope.cancel()
        for run in running:
            await run.done.wait()

    # -- starting a run ------------------------------------------------------------

    def start(self, body: bytes) -> Run:
        """Check a request, build its loop, record its events, start it. Raises BadRequest."""
        if not self.accepting or self.bus is None:
            raise BadRequest("the service is shutting down; try again later", 503)
        if len(body) > self.max_body:
            raise BadRequest(f"request body over {self.max_body} bytes", 413)
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
        ctx.run_config = dict(req.params)
        loop = ev.TrainingLoop(
            step,
            num_steps=req.num_steps,
            output_dir=self.output_dir,
            run_key=req.run_key,
            callbacks=callbacks,
            bus=self.bus,
            ctx=ctx,
        )
        history: deque[Envelope] = deque(maxlen=self.history)

        async def record(envelope: Envelope) -> None:
            history.append(envelope)

        # subscribed before the run starts: a client gets the run from its first event
        recorder = self.bus.subscribe(
            record,
            envelopes=True,
            run_key=req.run_key,
            policy=ev.DropOldest(self.history),
            name=f"history:{req.run_key}",
        )
        run = Run(req.run_key, loop, history, recorder)
        ended = [key for key, r in self.runs.items() if r.done.is_set()]
        for key in ended[: max(0, len(ended) - self.keep_finished + 1)]:
            del self.runs[key]  # the oldest ended runs go first: memory stays bounded
        self.runs[run.key] = run
        self.tg.start_soon(self._execute, run, name=f"run:{run.key}")
        return run

    async def _execute(self, run: Run) -> None:
        try:
            with run.scope:
                try:
                    await run.loop.run()
                except Exception as exc:  # a failed step: this run only, the others go on
                    _log.warning("run %s failed: %s: %s", run.key, type(exc).__name__, exc)
        finally:
            artifacts = run.loop.artifacts
            status = artifacts.status if artifacts is not None else "failed"
            try:
                run.status = RunStatus(status)
            except ValueError:
                run.status = RunStatus.FAILED
            with anyio.CancelScope(shield=True):
                await run.recorder.aclose(timeout=5.0)  # the history ends with TrainEnded
            run.done.set()

    def _run_dir(self, key: str) -> Path:
        path = self._inside(self.output_dir, key, "run_key")
        if path.parent != self.output_dir:
            raise BadRequest(f"run_key {key!r} must be one plain name, like 'lr-0.1'")
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

    # -- streaming a run's events --------------------------------------------------

    async def open_stream(self, run: Run) -> Stream:
        """Subscribe a client, then splice: the history up to now, the live events after."""
        assert self.bus is not None
        send, receive = anyio.create_memory_object_stream[Envelope](16)
        stream = Stream(run.key, send, receive)
        if not run.done.is_set():
            stream.sub = self.bus.subscribe(
                stream.forward,
                envelopes=True,
                run_key=run.key,
                policy=ev.DropOldest(self.client_window),
                name=f"sse:{run.key}",
            )
        cut = self.bus.last_seq  # the client's subscription gets every event after this
        try:
            await run.recorder.wait(cut, timeout=5.0)
        except BaseException:
            await stream.aclose()
            raise
        stream.snapshot = [e for e in run.history if e.seq <= cut]
        return stream

    def response(self, stream: Stream) -> Any:
        if self.on_trio:  # sse-starlette watches for shutdown with asyncio only
            inner: Response = StreamingResponse(
                stream.frames(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            )
        else:
            inner = EventSourceResponse(
                stream.frames(),
                shutdown_event=anyio.Event(),  # at shutdown: let the stream end on TrainEnded
                shutdown_grace_period=self.stream_grace,
            )
        return _Closing(inner, stream.aclose)


class Stream:
    """One SSE client: its bus subscription, the channel from it, its cleanup."""

    def __init__(
        self,
        key: str,
        send: MemoryObjectSendStream[Envelope],
        receive: MemoryObjectReceiveStream[Envelope],
    ) -> None:
        self.key = key
        self.send, self.receive = send, receive
        self.sub: ev.Subscription | None = None
        self.snapshot: list[Envelope] = []
        self._frames: AsyncGenerator[bytes, None] | None = None

    async def forward(self, envelope: Envelope) -> None:
        """The bus handler: waits while the client is slow (the bus keeps the newest
        ``client_window`` events meanwhile and counts the dropped ones)."""
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self.send.send(envelope)

    def frames(self) -> AsyncGenerator[bytes, None]:
        self._frames = self._generate()
        return self._frames

    async def _generate(self) -> AsyncGenerator[bytes, None]:
        for envelope in self.snapshot:
            yield _frame(envelope)
            if self._ends(envelope):
                return
        if self.sub is None:  # the run had ended when the client came
            return
        async for envelope in self.receive:
            yield _frame(envelope)
            if self._ends(envelope):
                return

    def _ends(self, envelope: Envelope) -> bool:
        return isinstance(envelope.event, TrainEnded) and envelope.event.run_key == self.key

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            if self._frames is not None:
                await self._frames.aclose()
            self.receive.close()
            self.send.close()
            if self.sub is not None:
                await self.sub.aclose(timeout=1.0)


def _frame(envelope: Envelope) -> bytes:
    event: Event = envelope.event
    data = ev.events.encode(event).decode()
    return ServerSentEvent(data=data, id=str(envelope.seq), event=type(event).__name__).encode()


class _Closing:
    """An ASGI response that runs ``cleanup`` however the response ends (finished,
    client gone, cancelled), so a client's subscription never outlives it."""

    def __init__(self, response: Any, cleanup: Callable[[], Any]) -> None:
        self.response, self.cleanup = response, cleanup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            await self.cleanup()


def _on_trio() -> bool:
    try:
        import sniffio
    except ImportError:  # trio brings sniffio: without it, this is asyncio
        return False
    return sniffio.current_async_library() == "trio"


# -- the app ----------------------------------------------------------------------------


def create_app(service: Service) -> Starlette:
    def refusing(handler: Callable[..., Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Any:
            try:
                return await handler(request)
            except BadRequest as exc:
                return JSONResponse({"detail": str(exc)}, status_code=exc.status)

        return endpoint

    async def start(request: Request) -> Response:
        run = service.start(await request.body())
        return JSONResponse(run.describe(), status_code=201)

    async def listing(request: Request) -> Response:
        return JSONResponse([run.describe() for run in service.runs.values()])

    async def one(request: Request) -> Response:
        return JSONResponse(service.get(request.path_params["key"]).describe())

    async def stop(request: Request) -> Response:
        run = service.get(request.path_params["key"])
        if run.loop.state is not None and not run.done.is_set():
            run.loop.state.request_stop("stopped through the service (DELETE)")
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
    signals: bool = False,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until ``stop`` is set (or, with ``signals``, SIGINT/SIGTERM);
    reports the base URL through ``task_status``.

    When the shutdown begins, the service's runs are cancelled first: servers
    wait for open connections before the lifespan's shutdown, and a live event
    stream ends only when its run does.
    """
    service: Service = app.state.service
    async with anyio.create_task_group() as tg:
        if backend == "asyncio":
            import uvicorn

            class Server(uvicorn.Server):
                async def shutdown(self, sockets: Any = None) -> None:
                    await service.cancel_runs()  # the runs end, so their streams do
                    await super().shutdown(sockets)

            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            server = Server(uvicorn.Config(app, log_config=None, access_log=False, ws="none"))

            async def watch() -> None:  # uvicorn handles SIGINT/SIGTERM itself
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
                async with anyio.create_task_group() as waiting:

                    async def on_signal() -> None:
                        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                            async for _ in sigs:
                                break
                        waiting.cancel_scope.cancel()

                    async def on_stop() -> None:
                        if stop is not None:
                            await stop.wait()
                            waiting.cancel_scope.cancel()

                    if signals:
                        waiting.start_soon(on_signal)
                    waiting.start_soon(on_stop)
                    await anyio.sleep_forever()
                await service.cancel_runs()  # the runs end, so their streams do

            config = hypercorn.Config()
            config.bind = [f"{host}:{port}"]
            config.errorlog = None
            config.graceful_timeout = service.stream_grace
            binds = await tg.start(
                partial(hypercorn.trio.serve, app, config, shutdown_trigger=trigger)  # type: ignore[arg-type]
            )
            task_status.started(binds[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--host", default="127.0.0.1", help="default: loopback only")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--output-dir", default="runs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(Service(args.output_dir))

    async def run() -> None:
        async with anyio.create_task_group() as tg:
            url = await tg.start(
                partial(serve, app, backend=args.backend, host=args.host, port=args.port,
                        signals=True)
            )  # fmt: skip
            print(f"serving on {url} (Ctrl-C to stop)", flush=True)

    anyio.run(run, backend=args.backend)


if __name__ == "__main__":
    main()
