"""examples/service.py: runs started over HTTP, each on an event loop of its own, their
events as server-sent events, stop and cancel, shutdown mid-run, and refusal of
untrusted input.

Real servers on loopback: Uvicorn on asyncio, Hypercorn on trio; real clients (httpx
streams, raw sockets that never read).
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import evsys_async as ev
from tests.servers import load_example, read_sse

service_mod = load_example("service")

pytestmark = [pytest.mark.anyio, pytest.mark.slow]  # the service serves HTTP on a socket


class Flag:
    """A flag set from any thread, awaited from any event loop (a run has its own)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await anyio.to_thread.run_sync(self._event.wait, abandon_on_cancel=True)


class Gate:
    """Holds a run's step ``params.hold_at`` until released; says when it got there.
    The step runs on the run's own event loop, the test on the service's."""

    def __init__(self) -> None:
        self.holding = Flag()
        self.release = Flag()

    async def step(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == int(state.ctx.run_config.get("fail_at", -1)):
            raise FloatingPointError("loss is nan")
        if step_idx == int(state.ctx.run_config.get("hold_at", -1)):
            self.holding.set()
            await self.release.wait()
        width = int(state.ctx.run_config.get("width", 1))  # how many metrics (event size)
        return {f"metric_{i:03d}": step_idx + i / 1000 for i in range(width)}


class Service(service_mod.Service):  # type: ignore[name-defined,misc]
    """The example's service, telling the test when stream clients come and go."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams: list[Any] = []
        self.stream_opened = anyio.Event()
        self.stream_closed = anyio.Event()
        self.want_streams = 1
        self.closed_streams = 0

    async def open_stream(self, run: Any) -> Any:
        stream = await super().open_stream(run)
        self.streams.append(stream)
        if len(self.streams) >= self.want_streams:
            self.stream_opened.set()
        close = stream.aclose

        async def aclose() -> None:
            await close()
            self.closed_streams += 1
            self.stream_closed.set()

        stream.aclose = aclose
        return stream


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, backend: str, **kwargs: Any
) -> AsyncIterator[tuple[Any, Gate, httpx.AsyncClient, anyio.Event]]:
    """The service on an ephemeral loopback port; yields it, its gate, a client and the
    event that begins the server's shutdown. Leaving the block shuts down and waits."""
    gate = Gate()
    service = Service(
        tmp_path / "out", steps={"toy": service_mod.toy_step, "gated": gate.step}, **kwargs
    )
    app = service_mod.create_app(service)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        url = await tg.start(partial(service_mod.serve, app, backend=backend, port=0, stop=stop))
        try:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                yield service, gate, client, stop
        finally:
            stop.set()
    gate.release.set()  # a step still held (its run cancelled) lets its thread go


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def written_outside(tmp_path: Path) -> list[str]:
    """What the output dir holds, after checking that nothing was made outside it."""
    assert not (tmp_path / "escape").exists() and not Path("/tmp/abs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "planted_evil.py"]
    return sorted(p.name for p in (tmp_path / "out").iterdir())


def envelopes(path: Path) -> list[dict[str, Any]]:
    """The envelopes of an events.jsonl (after its header line)."""
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if '"seq"' in line and '"event"' in line]


async def test_sse_clients_receive_every_event_of_a_short_run_in_order(
    tmp_path: Path, anyio_backend: str
) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend) as (service, gate, client, _):
            request = {
                "run_key": "short",
                "step": "gated",
                "num_steps": 6,
                "params": {"hold_at": 3},
            }
            created = await client.post("/runs", json=request)
            assert created.status_code == 201, created.text
            assert created.json()["status"] == "running"
            await gate.holding.wait()  # steps 0-2 are done: this client comes mid-run
            connected = anyio.Event()
            streams: list[list[tuple[int, str, Any]]] = []

            async def watch() -> None:
                streams.append(await read_sse(client, "/runs/short/events", connected))

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await connected.wait()
                gate.release.set()
            await service.runs["short"].done.wait()
            # a client that comes after the end gets the whole run from the history
            late = await read_sse(client, "/runs/short/events")
            status = (await client.get("/runs/short")).json()
    assert status["status"] == "completed" and status["steps_completed"] == 6
    logged = envelopes(tmp_path / "out" / "short" / "events.jsonl")
    expected = [(e["seq"], e["event"]["type"], e["event"]) for e in logged]
    assert [t for _, t, _ in expected][:2] == ["TrainStarted", "StepEnded"]
    assert expected[-1][1] == "TrainEnded"
    for got in (streams[0], late):
        assert got == expected  # every event, in order, ids = the bus's seq
    steps = [data["step"] for _, kind, data in late if kind == "StepEnded"]
    assert steps == list(range(6))


def _stall(host: str, port: int, key: str, n: int) -> list[socket.socket]:
    """``n`` clients that ask for the run's stream, then never read, on a tiny window."""
    socks = []
    for _ in range(n):
        stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        socks.append(stalled)
        stalled.connect((host, port))
        stalled.sendall(f"GET /runs/{key}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return socks


async def test_a_stalled_sse_client_leaves_training_going(
    tmp_path: Path, anyio_backend: str
) -> None:
    num_steps = 3000
    with anyio.fail_after(60):
        async with running(tmp_path, anyio_backend, history=20) as (service, gate, client, _):
            request = {
                "run_key": "big", "step": "gated", "num_steps": num_steps,
                "params": {"hold_at": 0, "width": 100},  # ~2.5 kB an event
            }  # fmt: skip
            assert (await client.post("/runs", json=request)).status_code == 201
            await gate.holding.wait()
            host, port = str(client.base_url.host), client.base_url.port
            socks = await anyio.to_thread.run_sync(_stall, host, port, "big", 1)
            try:
                await service.stream_opened.wait()
                gate.release.set()
                await service.runs["big"].done.wait()  # training ran to its end meanwhile
            finally:
                for stalled in socks:
                    stalled.close()
    run = service.runs["big"]
    assert run.status == "completed"
    assert run.loop.artifacts.steps_completed == num_steps
    # the client really was stalled: it fell behind the run's 20 kept events and lost
    # the oldest, while the run's one subscriber lost nothing
    (stream,) = service.streams
    assert stream.dropped > 0
    assert stream.sent + stream.dropped <= run.feed.end
    assert run.follower.stats().dropped == 0


async def test_stalled_clients_cost_the_run_nothing_per_step(
    tmp_path: Path, anyio_backend: str
) -> None:
    """Counted: the run's bus has the same subscribers and deliveries with 40 stalled
    clients as with none; the service's loop is woken once per batch of events, not
    per client or event; a stalled client's writes stop once its socket is full."""
    num_steps, clients = 2000, 40
    counts = {}
    with anyio.fail_after(90):
        async with running(tmp_path, anyio_backend) as (service, gate, client, _):
            service.want_streams = clients
            gate.release.set()
            for key, n in (("alone", 0), ("watched", clients)):
                request = {
                    "run_key": key, "step": "gated", "num_steps": num_steps,
                    "params": {"hold_at": 0 if n else -1, "width": 100},  # ~2.5 kB an event
                }  # fmt: skip
                if n:
                    gate.release, gate.holding = Flag(), Flag()
                assert (await client.post("/runs", json=request)).status_code == 201
                socks: list[socket.socket] = []
                try:
                    if n:
                        await gate.holding.wait()
                        host, port = str(client.base_url.host), client.base_url.port
                        socks = await anyio.to_thread.run_sync(_stall, host, port, key, n)
                        await service.stream_opened.wait()
                        gate.release.set()
                    await service.runs[key].done.wait()
                    run = service.runs[key]
                    counts[key] = (run.follower.stats(), run.feed.batches, run.feed.end)
                    # what each stalled client was sent, before it hangs up
                    sent = [(s.writes, s.sent) for s in service.streams if s.feed is run.feed]
                finally:
                    for stalled in socks:
                        stalled.close()
    (alone, _, events), (watched, watched_batches, watched_events) = (
        counts["alone"],
        counts["watched"],
    )
    # the run's side: the same events with or without clients (the run's own, and at
    # most a health event of the bus's), its one follower handling each once
    assert num_steps + 2 <= watched_events <= events + 2
    assert num_steps + 2 <= events <= watched_events + 2
    assert (alone.delivered, watched.delivered) == (events, watched_events)
    assert alone.dropped == watched.dropped == 0
    # the service's loop: one wake-up per batch (never per event, nor per client)
    assert watched_batches <= events // 2
    assert service.runs["watched"].loop.artifacts.status == "completed"
    # each stalled client: its writes stopped with its socket full, far short of the run
    assert len(sent) == clients
    for writes, events_sent in sent:
        assert writes <= events_sent < events // 4


async def test_a_client_that_goes_away_ends_its_stream(tmp_path: Path, anyio_backend: str) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend) as (service, gate, client, _):
            request = {
                "run_key": "gone",
                "step": "gated",
                "num_steps": 200,
                "params": {"hold_at": 3},
            }
            assert (await client.post("/runs", json=request)).status_code == 201
            await gate.holding.wait()
            host, port = str(client.base_url.host), client.base_url.port
            async with await anyio.connect_tcp(host, port) as conn:
                await conn.send(f"GET /runs/gone/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                received = b""
                while b"id: 0\r\n" not in received:  # the first event came: hang up
                    received += await conn.receive()
            # the client has gone; the stream notices at once or at its next write
            gate.release.set()
            await service.stream_closed.wait()
            await service.runs["gone"].done.wait()
    assert service.runs["gone"].status == "completed"
    (stream,) = service.streams
    assert stream.sent < service.runs["gone"].feed.end


async def test_a_failing_run_fails_alone_and_ended_runs_are_let_go(
    tmp_path: Path, anyio_backend: str
) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend, keep_finished=2) as (service, gate, client, _):
            gate.release.set()
            runs = [
                {"run_key": "bad", "step": "gated", "num_steps": 20, "params": {"fail_at": 4}},
                {"run_key": "good", "step": "gated", "num_steps": 20},
            ]
            for request in runs:
                assert (await client.post("/runs", json=request)).status_code == 201
            for key in ("bad", "good"):
                await service.runs[key].done.wait()
            statuses = {r["run_key"]: r["status"] for r in (await client.get("/runs")).json()}
            assert statuses == {"bad": "failed", "good": "completed"}
            events = await read_sse(client, "/runs/bad/events")
            assert events[-1][2]["status"] == "failed" and "loss is nan" in events[-1][2]["error"]
            # a third run lets the oldest ended one go (keep_finished=2)
            third = {"run_key": "third", "step": "gated", "num_steps": 1}
            assert (await client.post("/runs", json=third)).status_code == 201
            assert (await client.get("/runs/bad")).status_code == 404
            assert (await client.get("/runs/good")).status_code == 200
            again = await client.post("/runs", json={**third, "run_key": "bad"})
            assert again.status_code == 409  # its run dir stays: the key is still taken
            await service.runs["third"].done.wait()


async def test_delete_stops_the_run_after_its_current_step(
    tmp_path: Path, anyio_backend: str
) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend) as (service, gate, client, _):
            request = {
                "run_key": "halt",
                "step": "gated",
                "num_steps": 50,
                "params": {"hold_at": 2},
            }
            assert (await client.post("/runs", json=request)).status_code == 201
            await gate.holding.wait()
            deleted = await client.delete("/runs/halt")
            assert deleted.status_code == 202
            gate.release.set()
            await service.runs["halt"].done.wait()
            status = (await client.get("/runs/halt")).json()
            listed = (await client.get("/runs")).json()
            events = await read_sse(client, "/runs/halt/events")
    assert status["status"] == "stopped" == service_mod.RunStatus.STOPPED
    assert status["steps_completed"] == 3
    assert listed == [status]
    assert events[-1][1] == "TrainEnded" and events[-1][2]["status"] == "stopped"
    assert events[-2][1] == "StopRequested"


async def test_shutdown_mid_run_ends_runs_with_complete_files_and_train_ended_cancelled(
    tmp_path: Path, anyio_backend: str
) -> None:
    streams: list[list[tuple[int, str, Any]]] = []
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend) as (service, gate, client, stop):
            for key in ("one", "two"):
                request = {
                    "run_key": key, "step": "gated", "num_steps": 1000, "params": {"hold_at": 5},
                    "callbacks": [{"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}}],
                }  # fmt: skip
                assert (await client.post("/runs", json=request)).status_code == 201
            await gate.holding.wait()  # never released: only the shutdown ends these runs
            connected = anyio.Event()

            async def watch() -> None:
                streams.append(await read_sse(client, "/runs/one/events", connected))

            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await connected.wait()
                stop.set()  # the server's shutdown begins with a stream open
            refused = await _post_after_shutdown(client)
    # the server has exited (the block above returned)
    assert refused in (503, None)
    for key in ("one", "two"):
        run = service.runs[key]
        assert run.status == "cancelled"
        run_dir = tmp_path / "out" / key
        last = envelopes(run_dir / "events.jsonl")[-1]["event"]
        assert last["type"] == "TrainEnded" and last["status"] == "cancelled"
        assert json.loads((run_dir / "manifest.json").read_text())["status"] == "cancelled"
        rows = csv_rows(run_dir / "metrics.csv")
        steps_done = run.loop.artifacts.steps_completed
        assert [int(r["step"]) for r in rows if r.get("metric_000")] == list(range(steps_done))
        assert (run_dir / "summary.md").exists()
    (stream,) = streams
    assert stream[-1][1] == "TrainEnded" and stream[-1][2]["status"] == "cancelled"


async def _post_after_shutdown(client: httpx.AsyncClient) -> int | None:
    """A new run during or after the shutdown: refused (503) or no server at all."""
    try:
        response = await client.post(
            "/runs", json={"run_key": "late", "step": "toy", "num_steps": 1}
        )
    except httpx.TransportError:
        return None
    return response.status_code


def _plant_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A module that leaves a marker file when imported."""
    marker = tmp_path / "imported.marker"
    (tmp_path / "planted_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "def main(*a):\n    pass\nclass Cb:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"step": "os:system"}, 400, "step 'os:system' is not one this service offers; choose one of: gated, toy"),
        ({"step": "planted_evil:main"}, 400, "is not one this service offers"),
        ({"callbacks": [{"kind": "planted_evil:Cb"}]}, 400, "callbacks[0].kind: 'planted_evil:Cb' is not allowed here"),
        ({"callbacks": [{"kind": "tensorboard_logger"}]}, 400, "allowed: csv_metrics, early_stopping, print_progress"),
        ({"run_key": "../escape"}, 400, "run_key: '../escape' leads outside the service's output directory"),
        ({"run_key": "/tmp/abs"}, 400, "leads outside"),
        ({"run_key": ".."}, 400, "leads outside"),
        ({"run_key": "."}, 400, "leads outside"),
        ({"run_key": "a/b"}, 400, "must be one plain name"),
        ({"run_key": "nul\x00"}, 400, "leads outside"),
        ({"callbacks": [{"kind": "csv_metrics", "params": {"out_path": "../../../x.csv"}}]}, 400,
         "callbacks[0].params.out_path: '../../../x.csv' leads outside"),
        ({"callbacks": [{"kind": "csv_metrics", "params": {"out_path": "/tmp/x.csv"}}]}, 400, "leads outside"),
        ({"callbacks": [{"kind": "early_stopping", "params": {"metric": "acc", "patiense": 2}}]}, 400,
         "did you mean 'patience'?"),
        ({"stepp": "toy"}, 400, "invalid run request: Object contains unknown field `stepp`"),
        ({"num_steps": 0}, 400, "Expected `int` >= 1 - at `$.num_steps`"),
        ({"run_key": "taken"}, 409, "run key 'taken' is taken; pick another"),
    ],
)  # fmt: skip
async def test_untrusted_requests_are_refused_before_anything_is_imported_or_written(
    tmp_path: Path,
    anyio_backend: str,
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, Any],
    status: int,
    words: str,
) -> None:
    marker = _plant_module(tmp_path, monkeypatch)
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend) as (service, _, client, _):
            ok = await client.post(
                "/runs", json={"run_key": "taken", "step": "toy", "num_steps": 1}
            )
            assert ok.status_code == 201
            request = {"run_key": "fresh", "step": "toy", "num_steps": 3, **change}
            response = await client.post("/runs", json=request)
            await service.runs["taken"].done.wait()
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert not marker.exists() and "planted_evil" not in sys.modules
    assert written_outside(tmp_path) == ["taken"]


async def test_unknown_runs_are_404_and_bad_json_is_400(tmp_path: Path, anyio_backend: str) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend) as (_, _, client, _):
            for method, path in (
                ("GET", "/runs/nope"),
                ("DELETE", "/runs/nope"),
                ("GET", "/runs/nope/events"),
            ):
                response = await client.request(method, path)
                assert response.status_code == 404
                assert response.json()["detail"] == "no run 'nope'; GET /runs lists them"
            response = await client.post("/runs", content=b"{not json")
            assert response.status_code == 400
            assert response.json()["detail"].startswith("invalid run request: JSON is malformed")
            big = await client.post("/runs", content=b" " * (65 * 1024))
            assert big.status_code == 413


def test_the_service_binds_to_loopback_by_default() -> None:
    assert inspect.signature(service_mod.serve).parameters["host"].default == "127.0.0.1"
    source = Path(service_mod.__file__).read_text()
    assert 'parser.add_argument("--host", default="127.0.0.1"' in source


# -- stop now -------------------------------------------------------------------------


def _finished_files(run_dir: Path, status: str) -> dict[str, Any]:
    """The run's files are complete: events.jsonl ends with its TrainEnded, the manifest
    and the summary are written. Returns the TrainEnded."""
    last = envelopes(run_dir / "events.jsonl")[-1]["event"]
    assert last["type"] == "TrainEnded" and last["status"] == status
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == status
    assert (run_dir / "summary.md").exists()
    return last


async def test_delete_cancels_a_run_whose_step_hangs_after_the_grace(
    tmp_path: Path, anyio_backend: str
) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend, stop_grace=0.2) as (service, gate, client, _):
            request = {
                "run_key": "hung",
                "step": "gated",
                "num_steps": 50,
                "params": {"hold_at": 2},
            }
            assert (await client.post("/runs", json=request)).status_code == 201
            await gate.holding.wait()  # never released: the step hangs at its await
            deleted = await client.delete("/runs/hung")
            assert deleted.status_code == 202
            await service.runs["hung"].done.wait()
            status = (await client.get("/runs/hung")).json()
    assert status["status"] == "cancelled"
    assert status["steps_completed"] == 2
    assert status["stop_reason"] == "did not stop within 0.2 s of a DELETE; cancelled"
    ended = _finished_files(tmp_path / "out" / "hung", "cancelled")
    assert ended["stop_reason"] == status["stop_reason"]


class Stuck:
    """A ``def`` step that blocks its thread at step 1 until the test lets it go."""

    def __init__(self) -> None:
        self.holding = Flag()
        self.release = threading.Event()

    def step(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 1:
            self.holding.set()
            self.release.wait(60)  # a stuck data loader: nothing can interrupt it
        return {"loss": 1.0}


async def test_delete_force_cancels_a_def_step_in_flight_at_once(
    tmp_path: Path, anyio_backend: str
) -> None:
    stuck = Stuck()
    gate = Gate()
    service = Service(
        tmp_path / "out", steps={"stuck": stuck.step, "gated": gate.step}, cancel_grace=0.2
    )
    app = service_mod.create_app(service)
    stop = anyio.Event()
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                url = await tg.start(
                    partial(service_mod.serve, app, backend=anyio_backend, port=0, stop=stop)
                )
                async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                    request = {"run_key": "stuck", "step": "stuck", "num_steps": 10}
                    assert (await client.post("/runs", json=request)).status_code == 201
                    await stuck.holding.wait()
                    bad = await client.delete("/runs/stuck?force=yes")
                    assert bad.status_code == 400
                    assert bad.json()["detail"] == "force='yes': use ?force=true or leave it out"
                    deleted = await client.delete("/runs/stuck?force=true")
                    assert deleted.status_code == 202
                    await service.runs["stuck"].done.wait()  # its thread abandoned
                    status = (await client.get("/runs/stuck")).json()
                stop.set()
    finally:
        stuck.release.set()
    assert status["status"] == "cancelled" and status["steps_completed"] == 1
    assert status["stop_reason"] == "cancelled through the service (DELETE ?force=true)"
    _finished_files(tmp_path / "out" / "stuck", "cancelled")


# -- every request bounded --------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"params": {"delay": 1e308}}, "params of step 'toy': Expected `float` <= 10.0 - at `$.delay`"),
        ({"params": {"delay": -1}}, "params of step 'toy': Expected `float` >= 0.0 - at `$.delay`"),
        ({"params": {"delay": "soon"}}, "Expected `float`, got `str` - at `$.delay`"),
        ({"params": {"dealy": 1}}, "params of step 'toy': Object contains unknown field `dealy`"),
        ({"run_key": "a\nb"}, "run_key 'a\\nb': '\\n' is not allowed; a run key holds only letters, digits and '-', '_', '.'"),
        ({"run_key": "evil\u202etxt.exe"}, "'\\u202e' is not allowed; a run key holds only letters"),
        ({"run_key": "%2e%2e%2fevil"}, "'%' is not allowed"),
        ({"run_key": "a b"}, "' ' is not allowed"),
    ],
)  # fmt: skip
async def test_params_and_run_keys_are_checked_before_a_run_starts(
    tmp_path: Path, anyio_backend: str, change: dict[str, Any], words: str
) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend) as (service, _, client, _):
            request = {"run_key": "fresh", "step": "toy", "num_steps": 3, **change}
            response = await client.post("/runs", json=request)
    assert response.status_code == 400, response.text
    assert words in response.json()["detail"]
    assert service.runs == {}
    assert list((tmp_path / "out").iterdir()) == []


async def test_keys_of_any_script_and_their_links_percent_encoded(
    tmp_path: Path, anyio_backend: str
) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend) as (_, _, client, _):
            request = {"run_key": "über-学習_1.0", "step": "toy", "num_steps": 2}
            created = await client.post("/runs", json=request)
            assert created.status_code == 201, created.text
            link = created.json()["events"]
            events = await read_sse(client, link)  # the link reaches the stream
    assert link == "/runs/%C3%BCber-%E5%AD%A6%E7%BF%92_1.0/events"
    assert events[-1][1] == "TrainEnded" and events[-1][2]["run_key"] == "über-学習_1.0"
    assert (tmp_path / "out" / "über-学習_1.0" / "events.jsonl").exists()


def _post_raw(host: str, port: int, head: bytes, body_chunks: Any) -> bytes:
    """Send ``head`` then the chunks until the server stops taking them; the reply."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # the server refused the rest and closed
            for chunk in body_chunks:
                sock.sendall(chunk)
        reply = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                reply += chunk
    return reply


def _chunked(total: int, size: int = 64 * 1024) -> Any:
    piece = b"x" * size
    for _ in range(total // size):
        yield b"%x\r\n%s\r\n" % (size, piece)
    yield b"0\r\n\r\n"


def _head(host: str, **headers: str) -> bytes:
    lines = ["POST /runs HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_bodies_over_the_limit_are_refused_while_they_stream_in(
    tmp_path: Path, anyio_backend: str
) -> None:
    with anyio.fail_after(30):
        async with running(tmp_path, anyio_backend) as (_, _, client, _):
            host, port = str(client.base_url.host), client.base_url.port
            # a Content-Length over the limit: refused before a byte of the body is sent
            told = await anyio.to_thread.run_sync(
                _post_raw, host, port, _head(host, **{"Content-Length": "300000000"}), []
            )
            # chunked: cut once past the limit (the client may send a little more)
            cut = await anyio.to_thread.run_sync(
                _post_raw,
                host,
                port,
                _head(host, **{"Transfer-Encoding": "chunked"}),
                _chunked(4 * 1024 * 1024),
            )
    for reply, words in (
        (told, "request body of 300000000 bytes is over 65536 bytes"),
        (cut, "request body over 65536 bytes (cut while reading)"),
    ):
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), reply[:200]
        assert b"connection: close" in head.lower()
        if b"transfer-encoding: chunked" in head.lower():
            body = body.split(b"\r\n")[1]
        assert json.loads(body) == {"detail": words}


# -- the example as a process: memory under a huge body, Ctrl-C ---------------------------


@contextlib.contextmanager
def _served(tmp_path: Path, backend: str) -> Any:
    example = Path(service_mod.__file__)
    cmd = [sys.executable, str(example), "--backend", backend, "--port", "0"]
    cmd += ["--output-dir", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        said = proc.stdout.readline()
        assert said.startswith("serving on http://"), said + proc.stderr.read()
        yield proc, said.split()[2]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status")
async def test_a_300_mb_body_leaves_the_servers_memory_alone(
    tmp_path: Path, anyio_backend: str
) -> None:
    with _served(tmp_path, anyio_backend) as (proc, url), anyio.fail_after(120):
        host, port = url.removeprefix("http://").split(":")
        async with httpx.AsyncClient(base_url=url) as client:  # warm: a run, a stream
            request = {"run_key": "warm", "step": "toy", "num_steps": 3}
            assert (await client.post("/runs", json=request)).status_code == 201
            await read_sse(client, "/runs/warm/events")
        before = _peak_rss_kb(proc.pid)
        replies = []
        for head in (
            _head(host, **{"Content-Length": str(300 * 1024 * 1024)}),
            _head(host, **{"Transfer-Encoding": "chunked"}),
        ):
            replies.append(
                await anyio.to_thread.run_sync(
                    _post_raw, host, int(port), head, _chunked(300 * 1024 * 1024)
                )
            )
        after = _peak_rss_kb(proc.pid)
    assert all(r.startswith(b"HTTP/1.1 413") for r in replies), [r[:100] for r in replies]
    assert after - before < 30 * 1024, f"peak RSS grew {before} -> {after} kB"


async def test_ctrl_c_cancels_the_runs_prints_the_summary_and_exits_130(
    tmp_path: Path, anyio_backend: str
) -> None:
    with _served(tmp_path, anyio_backend) as (proc, url):
        with anyio.fail_after(60):
            async with httpx.AsyncClient(base_url=url) as client:
                for key in ("one", "two"):
                    request = {"run_key": key, "step": "toy", "num_steps": 100_000,
                               "params": {"delay": 0.01}}  # fmt: skip
                    assert (await client.post("/runs", json=request)).status_code == 201
                connected = anyio.Event()
                streams: list[list[tuple[int, str, Any]]] = []

                async def watch() -> None:
                    streams.append(await read_sse(client, "/runs/one/events", connected))

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    await connected.wait()
                    proc.send_signal(signal.SIGINT)
            out, err = await anyio.to_thread.run_sync(proc.communicate)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "SIGINT received: cancelling the runs and stopping" in err
    lines = out.splitlines()
    assert lines[0] == f"2 run(s) in {tmp_path / 'out'}"
    for key in ("one", "two"):
        (line,) = [x for x in lines if x.startswith(f"  {key}: ")]
        assert line.startswith(f"  {key}: cancelled after ")
        assert line.endswith("/100000 steps (the service is shutting down)")
        _finished_files(tmp_path / "out" / key, "cancelled")
    (stream,) = streams
    assert stream[-1][1] == "TrainEnded" and stream[-1][2]["status"] == "cancelled"
