"""HttpEvaluator against a real Starlette eval server on loopback (Uvicorn on asyncio,
Hypercorn on trio): metrics at every due step, and each failure the documented event."""

from __future__ import annotations

import base64
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import evsys_async as ev
from evsys_async.evaluators import HttpEvalError, HttpEvaluator, build_evaluators
from evsys_async.events import EvalEnded, EvalFailed, Event, TrainEnded
from tests.servers import free_port, serving

pytestmark = pytest.mark.anyio


ROUTES = ("flat", "nested", "flaky", "down5xx", "slow", "garbage", "words", "teapot")
ROUTES += ("listing", "echo", "drip", "endless", "announced", "deep")


def written(root: Path) -> list[str]:
    """The text of every file under ``root``."""
    return [p.read_text(errors="replace") for p in root.rglob("*") if p.is_file()]


class EvalServer:
    """An eval server whose routes each misbehave in one way; it records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.release = anyio.Event()  # the slow route answers once this is set
        self.flaky_calls = 0

    def app(self) -> Starlette:
        return Starlette(
            routes=[Route(f"/{name}", getattr(self, name), methods=["POST"]) for name in ROUTES]
        )

    async def _record(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        self.requests.append((request.url.path, body, dict(request.headers)))
        return dict(body)

    async def flat(self, request: Request) -> Response:
        body = await self._record(request)
        return JSONResponse({"acc": body["step"] / 10, "loss": 1})

    async def nested(self, request: Request) -> Response:
        body = await self._record(request)
        return JSONResponse({"metrics": {"acc": body["step"] / 10}, "note": "ignored"})

    async def flaky(self, request: Request) -> Response:
        await self._record(request)
        self.flaky_calls += 1
        if self.flaky_calls % 2:  # every first try fails
            return JSONResponse({"error": "warming up"}, status_code=500)
        return JSONResponse({"acc": 1.0})

    async def down5xx(self, request: Request) -> Response:
        await self._record(request)
        return Response("overloaded", status_code=503)

    async def slow(self, request: Request) -> Response:
        await self._record(request)
        await self.release.wait()
        return JSONResponse({"acc": 1.0})

    async def drip(self, request: Request) -> Response:
        """A reply that trickles in: each piece in time, the whole far too late."""
        await self._record(request)

        async def pieces() -> AsyncIterator[bytes]:
            yield b'{"acc": 1.0'
            for _ in range(20):
                await anyio.sleep(0.05)
                yield b" "
            yield b"}"

        return StreamingResponse(pieces(), media_type="application/json")

    async def endless(self, request: Request) -> Response:
        """A reply that never ends (no Content-Length): only a bound read while it
        streams in stops the client; it counts what it sent."""
        await self._record(request)
        self.sent = 0

        async def pieces() -> AsyncIterator[bytes]:
            yield b'{"acc": [' + b"0.5, " * 1000
            while True:
                self.sent += 1
                await anyio.lowlevel.checkpoint()
                yield b"0.5, " * 1000

        return StreamingResponse(pieces(), media_type="application/json")

    async def announced(self, request: Request) -> Response:
        """A 7 MB reply of 400,000 numbers, its Content-Length said up front."""
        await self._record(request)
        body = b'{"metrics": {' + b",".join(b'"m%d": 0.5' % i for i in range(400_000)) + b"}}"
        return Response(body, media_type="application/json")

    async def deep(self, request: Request) -> Response:
        await self._record(request)
        return Response(b"[" * 10_000 + b"]" * 10_000, media_type="application/json")

    async def garbage(self, request: Request) -> Response:
        await self._record(request)
        return HTMLResponse("<html><body>Bad Gateway</body></html>")

    async def words(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"acc": "high"})

    async def listing(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse([0.9, 0.1])

    async def teapot(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"detail": "step must be odd"}, status_code=409)

    async def echo(self, request: Request) -> Response:
        """Answers 400 quoting what it was sent: an error must not show the secrets."""
        await self._record(request)
        return Response(
            f"bad token {request.headers.get('authorization')} from {request.url}",
            status_code=400,
        )


async def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    return {"loss": 1.0 / (step_idx + 1)}


async def run_with(
    tmp_path: Path, *evaluators: Any, num_steps: int = 4, **kwargs: Any
) -> tuple[ev.LoopArtifacts, list[Event]]:
    """Run a loop on our own bus; return its artifacts and its eval and end events."""
    seen: list[Event] = []

    async def record(event: Event) -> None:
        seen.append(event)

    async with ev.EventBus() as bus:
        bus.subscribe(record, events=(EvalEnded, EvalFailed, TrainEnded))
        loop = ev.TrainingLoop(
            step,
            num_steps=num_steps,
            output_dir=tmp_path,
            run_key="http",
            evaluators=list(evaluators),
            bus=bus,
            **kwargs,
        )
        artifacts = await loop.run()
        await bus.drain(10)
    return artifacts, seen


def evals(seen: list[Event]) -> list[tuple[str, int, Any]]:
    """(event type, step, metrics or error) of each eval event, by step then eval name."""
    found = [e for e in seen if isinstance(e, EvalEnded | EvalFailed)]
    found.sort(key=lambda e: (e.step, e.eval_name))
    return [
        (type(e).__name__, e.step, dict(e.metrics) if isinstance(e, EvalEnded) else e.error)
        for e in found
    ]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inline", "background"])
async def test_metrics_arrive_as_eval_ended_at_every_due_step(tmp_path: Path, mode: str) -> None:
    server = EvalServer()
    with anyio.fail_after(30):
        async with serving(server.app()) as url:
            flat = HttpEvaluator(
                f"{url}/flat",
                name="remote",
                run_every=2,
                payload=lambda state, step_idx: {"model": "m1", "step": -1},
            )
            nested = HttpEvaluator(f"{url}/nested", name="nested", run_every=3)
            artifacts, seen = await run_with(tmp_path, flat, nested, num_steps=6, eval_mode=mode)
    assert (artifacts.status, artifacts.steps_completed) == ("completed", 6)
    assert evals(seen) == [
        ("EvalEnded", 1, {"acc": 0.1, "loss": 1.0}),
        ("EvalEnded", 2, {"acc": 0.2}),
        ("EvalEnded", 3, {"acc": 0.3, "loss": 1.0}),
        ("EvalEnded", 5, {"acc": 0.5}),  # "nested" sorts before "remote"
        ("EvalEnded", 5, {"acc": 0.5, "loss": 1.0}),
    ]
    flat_bodies = [body for path, body, _ in server.requests if path == "/flat"]
    # the step and run key win over the payload's keys of the same name
    assert flat_bodies == [{"model": "m1", "step": s, "run_key": "http"} for s in (1, 3, 5)]
    assert isinstance(seen[-1], TrainEnded) and seen[-1].status == "completed"


async def test_server_down_is_retried_then_an_eval_failed(tmp_path: Path) -> None:
    down = HttpEvaluator(
        f"http://127.0.0.1:{free_port()}/eval", run_every=2, retries=2, backoff=0.01
    )
    with anyio.fail_after(30):
        artifacts, seen = await run_with(tmp_path, down)
    assert (artifacts.status, artifacts.steps_completed) == ("completed", 4)
    failures = evals(seen)
    assert [(kind, s) for kind, s, _ in failures] == [("EvalFailed", 1), ("EvalFailed", 3)]
    error = failures[0][2]
    assert error.startswith("HttpEvalError: POST http://127.0.0.1:")
    assert "connection failed (ConnectError" in error and error.endswith("after 3 attempts")
    assert "\n" not in error


@pytest.mark.slow
async def test_slow_server_past_the_timeout_is_an_eval_failed(tmp_path: Path) -> None:
    server = EvalServer()
    with anyio.fail_after(30):
        async with serving(server.app()) as url:
            slow = HttpEvaluator(f"{url}/slow", run_every=2, timeout=0.2, retries=3)
            artifacts, seen = await run_with(tmp_path, slow)
            server.release.set()
    assert (artifacts.status, artifacts.steps_completed) == ("completed", 4)
    failures = evals(seen)
    assert [s for _, s, _ in failures] == [1, 3]
    assert failures[0][2] == (
        f"HttpEvalError: POST {url}/slow: no reply within 0.2s (timeout); not retried"
    )
    assert len(server.requests) == 2  # a timeout is not retried


@pytest.mark.slow
async def test_timeout_bounds_the_whole_attempt_not_each_read(tmp_path: Path) -> None:
    server = EvalServer()
    with anyio.fail_after(30):
        async with serving(server.app()) as url:
            drip = HttpEvaluator(f"{url}/drip", run_every=4, timeout=0.3)
            artifacts, seen = await run_with(tmp_path, drip)
    assert artifacts.status == "completed"
    assert evals(seen) == [
        (
            "EvalFailed",
            3,
            f"HttpEvalError: POST {url}/drip: no reply within 0.3s (timeout); not retried",
        )
    ]


@pytest.mark.slow
async def test_500_then_200_is_retried_into_an_eval_ended(tmp_path: Path) -> None:
    server = EvalServer()
    with anyio.fail_after(30):
        async with serving(server.app()) as url:
            flaky = HttpEvaluator(f"{url}/flaky", run_every=2, backoff=0.01)
            unlucky = HttpEvaluator(
                f"{url}/down5xx", name="busy", run_every=4, retries=1, backoff=0
            )
            artifacts, seen = await run_with(tmp_path, flaky, unlucky)
    assert artifacts.status == "completed"
    assert evals(seen) == [
        ("EvalEnded", 1, {"acc": 1.0}),
        (
            "EvalFailed",
            3,
            f"HttpEvalError: POST {url}/down5xx: HTTP 503 Service Unavailable after 2 attempts",
        ),
        ("EvalEnded", 3, {"acc": 1.0}),
    ]
    assert [p for p, _, _ in server.requests].count("/flaky") == 4  # 500 then 200, twice


@pytest.mark.slow
@pytest.mark.parametrize(
    ("route", "reason"),
    [
        (
            "garbage",
            "reply is not JSON (text/html; charset=utf-8): <html><body>Bad Gateway</body></html>",
        ),
        (
            "words",
            'reply\'s metric \'acc\' is "high", not a number; reply with {"name": number, ...}',
        ),
        ("listing", "reply is a JSON list, not a mapping of metric names to numbers"),
        ("teapot", 'HTTP 409 Conflict, not retried: {"detail":"step must be odd"}'),
        (
            "deep",
            "reply nests deeper than the limit of 128 levels of arrays and objects; not decoded",
        ),
        (
            "announced",
            "reply larger than the limit of 1,048,576 bytes (its Content-Length is 5,",
        ),
    ],
)
async def test_replies_that_are_not_metrics_are_eval_failed(
    tmp_path: Path, route: str, reason: str, warnings_log: pytest.LogCaptureFixture
) -> None:
    server = EvalServer()
    with anyio.fail_after(30):
        async with serving(server.app()) as url:
            bad = HttpEvaluator(f"{url}/{route}", run_every=2)
            artifacts, seen = await run_with(tmp_path, bad)
    assert (artifacts.status, artifacts.steps_completed) == ("completed", 4)
    failures = evals(seen)
    assert [(k, s) for k, s, _ in failures] == [("EvalFailed", 1), ("EvalFailed", 3)]
    assert failures[0][2].startswith(f"HttpEvalError: POST {url}/{route}: {reason}")
    assert len(server.requests) == 2  # none of these is retried
    assert "evaluator failed; training goes on" in warnings_log.text


@pytest.mark.slow
async def test_a_reply_past_max_reply_bytes_is_dropped_while_it_streams_in(
    tmp_path: Path,
) -> None:
    """The body is read chunk by chunk and dropped past the limit: a reply that never
    ends is an EvalFailed naming the URL and the limit, not a run that never ends."""
    server = EvalServer()
    with anyio.fail_after(30):
        async with serving(server.app()) as url:
            endless = HttpEvaluator(f"{url}/endless", run_every=2, max_reply_bytes=50_000)
            artifacts, seen = await run_with(tmp_path, endless)
    assert (artifacts.status, artifacts.steps_completed) == ("completed", 4)
    failures = evals(seen)
    assert [(k, s) for k, s, _ in failures] == [("EvalFailed", 1), ("EvalFailed", 3)]
    assert failures[0][2] == (
        f"HttpEvalError: POST {url}/endless: reply larger than the limit of 50,000 bytes "
        "(more than 50,000 bytes arrived); dropped unread, not retried. A reply of metrics "
        "is a few hundred bytes: have the server send fewer, or raise max_reply_bytes"
    )
    assert len(server.requests) == 2  # not retried


@pytest.mark.slow
async def test_secrets_never_reach_logs_events_files_or_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # httpx's request log (INFO) and ours (DEBUG) included
    server = EvalServer()
    password, token, key = "pw-s3cret-1", "tok-s3cret-2", "key-s3cret-3"
    basic = base64.b64encode(f"evaluser:{password}".encode()).decode()
    planted = (password, token, key, basic)
    with anyio.fail_after(30):
        async with serving(server.app()) as url:
            host = url.removeprefix("http://")
            evaluators = [
                HttpEvaluator(
                    f"http://evaluser:{password}@{host}/{route}",  # basic auth from the URL
                    name=f"basic-{route}",
                    run_every=1,
                    retries=1,
                    backoff=0,
                )
                for route in ("echo", "flat")
            ] + [
                HttpEvaluator(
                    f"{url}/{route}?api_key={key}&n=1",
                    name=f"token-{route}",
                    run_every=1,
                    retries=1,
                    backoff=0,
                    headers={"Authorization": f"Bearer {token}"},
                )
                for route in ("echo", "down5xx", "garbage", "flat")
            ]
            callbacks = ev.build_callbacks([{"kind": "local_logger"}, {"kind": "debug_logger"}])
            artifacts, seen = await run_with(
                tmp_path, *evaluators, num_steps=2, callbacks=callbacks
            )
    assert artifacts.status == "completed"
    # the secrets were sent: basic auth from the URL, the header, the query
    sent = {(path, h["authorization"]) for path, _, h in server.requests}
    assert ("/flat", f"Basic {basic}") in sent and ("/flat", f"Bearer {token}") in sent
    assert sum(k == "EvalEnded" for k, _, _ in evals(seen)) == 4
    assert "HTTP Request: POST" in caplog.text  # httpx did log the requests
    shown = [caplog.text, *(repr(e) for e in seen), *(repr(e) for e in evaluators)]
    shown += written(tmp_path)
    assert len(shown) > 5 and any("***" in text for text in shown)
    for text in shown:
        for secret in planted:
            assert secret not in text
    errors = {e.eval_name: e.error for e in seen if isinstance(e, EvalFailed)}
    assert errors["token-echo"].startswith(
        f"HttpEvalError: POST http://{host}/echo?api_key=***&n=1: HTTP 400 Bad Request, "
        "not retried: bad token *** from"
    )
    assert errors["basic-echo"].startswith(
        f"HttpEvalError: POST http://evaluser:***@{host}/echo: HTTP 400 Bad Request, "
        "not retried: bad token Basic *** from"
    )


@pytest.mark.slow
async def test_outside_a_loop_async_with_opens_and_closes_the_client() -> None:
    server = EvalServer()
    state = ev.LoopState(num_steps=1)
    with anyio.fail_after(30):
        async with serving(server.app()) as url:
            evaluator = HttpEvaluator(f"{url}/flat", run_every=1)
            with pytest.raises(HttpEvalError, match="no open HTTP client"):
                await evaluator.evaluate(state, 0)
            async with evaluator:
                assert await evaluator.evaluate(state, 4) == {"acc": 0.4, "loss": 1.0}
            with pytest.raises(HttpEvalError, match="no open HTTP client"):
                await evaluator.evaluate(state, 0)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (
            {"url": "ftp://host/eval"},
            "url must be an http:// or https:// URL, got 'ftp://host/eval'",
        ),
        ({"url": "ftp://u:pw@host/eval"}, "got 'ftp://u:***@host/eval'"),
        ({"timeout": 0}, "timeout must be > 0 seconds, got 0"),
        ({"retries": -1}, "retries must be >= 0, got -1"),
        ({"max_concurrency": 0}, "max_concurrency must be >= 1, got 0"),
        ({"payload": {"a": 1}}, "payload must be a callable (state, step_idx) -> mapping"),
        ({"max_reply_bytes": 0}, "max_reply_bytes must be >= 1 (bytes), got 0"),
    ],
)
def test_bad_arguments_name_the_fix(kwargs: dict[str, Any], words: str) -> None:
    args = {"url": "http://127.0.0.1:1/eval", "run_every": 1, **kwargs}
    with pytest.raises(ValueError) as info:
        HttpEvaluator(**args)
    assert words in str(info.value)


def test_registered_kind_http_builds_from_a_config() -> None:
    (built,) = build_evaluators(
        [{"kind": "http", "params": {"url": "http://127.0.0.1:8000/eval", "run_every": 5}}]
    )
    assert isinstance(built, HttpEvaluator)
    assert (built.name, built.run_every, built.timeout, built.retries) == ("remote", 5, 10.0, 3)
    with pytest.raises(
        ev.ConfigError, match=r"evaluators\[0\]\.params\.retires .*did you mean 'retries'"
    ):
        build_evaluators(
            [{"kind": "http", "params": {"url": "http://x/e", "run_every": 1, "retires": 2}}]
        )
    with pytest.raises(ev.ConfigError, match=r"evaluators\[0\]\.params.*url must be an http"):
        build_evaluators([{"kind": "http", "params": {"url": "x", "run_every": 1}}])


@pytest.mark.slow
def test_without_httpx_the_error_names_the_extra(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "from evsys_async.evaluators import HttpEvaluator\n"
        "try:\n"
        "    HttpEvaluator('http://127.0.0.1:1/eval', run_every=1)\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HttpEvaluator needs the optional dependency 'httpx'" in out.stdout
    assert "pip install 'evsys-async[http]'" in out.stdout
