"""One process, one event loop: an async eval server and the training that calls it.

A Starlette eval server (served by Uvicorn on asyncio, by Hypercorn on trio) and
a ``TrainingLoop`` whose ``HttpEvaluator`` posts the model to it every 10 steps
in ``eval_mode="background"``: training steps go on while the server scores.

    pip install 'evsys-async[http]' starlette uvicorn hypercorn trio
    python examples/eval_server.py                  # asyncio + Uvicorn
    python examples/eval_server.py --backend trio   # trio + Hypercorn
    python examples/eval_server.py --port 8000      # the eval server alone, to try with curl

Each eval line shows the step it evaluated and the step training had reached
when the score came back. The eval server binds to 127.0.0.1 on a free port.

With ``--port N`` only the eval server runs, on 127.0.0.1:N, until Ctrl-C (or
SIGTERM), which stops it gracefully (exit 0); it prints its URL first::

    curl -s -X POST http://127.0.0.1:8000/eval -d '{"step": 9, "weight": 2.5}'
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import evsys_async as ev
from evsys_async.evaluators import HttpEvaluator

TARGET = 3.0  # the model is one number, trained towards TARGET

Scorer = Callable[[float, int], Awaitable[dict[str, float]]]


async def score(weight: float, step: int) -> dict[str, float]:
    """The eval server's work: slow, like a real eval; it awaits, so training goes on."""
    await anyio.sleep(0.05)
    return {"loss": (weight - TARGET) ** 2, "close": float(abs(weight - TARGET) < 0.1)}


def make_app(scorer: Scorer = score) -> Starlette:
    """The eval server: ``POST /eval {"step", "run_key", "weight"}`` -> ``{"metrics": {...}}``."""

    async def evaluate(request: Request) -> JSONResponse:
        body = await request.json()
        try:
            weight, step = float(body["weight"]), int(body["step"])
        except (KeyError, TypeError, ValueError):
            return JSONResponse({"detail": "expected {step: int, weight: number}"}, 422)
        return JSONResponse({"metrics": await scorer(weight, step), "step": step})

    return Starlette(routes=[Route("/eval", evaluate, methods=["POST"])])


@contextlib.asynccontextmanager
async def serving(
    app: Any, *, backend: str, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[str]:
    """Serve ``app`` in this event loop and yield its base URL; stop it on exit.

    Uvicorn runs on asyncio only; on trio, Hypercorn serves the same app.
    """
    async with anyio.create_task_group() as tg:
        if backend == "asyncio":
            import uvicorn

            # bind first, so the URL is known at once (the port may be 0: a free one)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, port))
            sock.listen(128)
            url = f"http://{host}:{sock.getsockname()[1]}"
            server = uvicorn.Server(
                uvicorn.Config(app, log_config=None, access_log=False, ws="none")
            )
            tg.start_soon(server.serve, [sock])
            try:
                yield url
            finally:
                server.should_exit = True  # graceful: open requests finish first
        else:
            import hypercorn
            import hypercorn.trio

            config = hypercorn.Config()
            config.bind = [f"{host}:{port}"]
            config.errorlog = None
            stop = anyio.Event()
            binds = await tg.start(
                partial(hypercorn.trio.serve, app, config, shutdown_trigger=stop.wait)
            )
            try:
                yield binds[0]
            finally:
                stop.set()


async def train_step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    weight = 0.0 if state.model is None else state.model  # the model starts at 0
    state.model = weight + 0.05 * (TARGET - weight)  # a gradient step on (w - TARGET)^2
    await anyio.sleep(0.002)  # as a step on an accelerator would await
    return {"train_loss": (state.model - TARGET) ** 2}


class PrintEvals(ev.Callback):
    async def on_eval(
        self, state: ev.LoopState, step_idx: int, eval_name: str, metrics: Any
    ) -> None:
        print(
            f"[eval of step {step_idx + 1}] loss={metrics['loss']:.4f} "
            f"(training had reached step {state.step + 1})"
        )


async def main(
    backend: str = "asyncio",
    *,
    num_steps: int = 100,
    output_dir: str = "runs",
    scorer: Scorer = score,
    callbacks: Sequence[ev.Callback] = (),
) -> ev.LoopArtifacts:
    async with serving(make_app(scorer), backend=backend) as url:
        evaluator = HttpEvaluator(
            f"{url}/eval",
            name="server",
            run_every=10,
            timeout=5.0,
            payload=lambda state, step_idx: {"weight": state.model},
        )
        loop = ev.TrainingLoop(
            train_step,
            num_steps=num_steps,
            output_dir=output_dir,
            run_key="eval-server",
            evaluators=[evaluator],
            eval_mode="background",
            snapshot=lambda state: state.model,  # what a background eval reads
            callbacks=[PrintEvals(), *callbacks],
        )
        return await loop.run()


async def serve_alone(backend: str, port: int, host: str = "127.0.0.1") -> None:
    """The eval server on its own until SIGINT or SIGTERM, then a graceful stop."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with serving(make_app(), backend=backend, host=host, port=port) as url:
            print(f"eval server: POST {url}/eval (Ctrl-C stops it)", flush=True)
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: stopping", flush=True)
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--port", type=int, help="serve the eval server alone on this port")
    args = parser.parse_args()
    if args.port is not None:
        anyio.run(serve_alone, args.backend, args.port, backend=args.backend)
    else:
        artifacts = anyio.run(
            partial(main, args.backend, num_steps=args.steps), backend=args.backend
        )
        print(artifacts.status, artifacts.steps_completed, artifacts.run_dir)
