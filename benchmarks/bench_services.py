"""Training inside a service under web load: does HTTP traffic slow the steps?

Run: ``python benchmarks/bench_services.py`` (a few minutes; ``--quick`` for a
one round, exit status 1 when a target fails, ``--backend asyncio`` or ``trio``).

``examples/service.py`` is served in a child process (Uvicorn on asyncio,
Hypercorn on trio); everything goes through its HTTP API. Each run is 3,000
steps of 1 ms (``params.delay``), started with ``POST /runs``, under one of
three loads, measured side by side in the same rounds (interleaved):

* ``0 clients``: nobody watches;
* ``50 active``: 50 SSE clients read the run's event stream to its end;
* ``200 stalled``: 200 raw sockets (a 4 kB receive buffer) send
  ``GET /runs/{key}/events`` and never read a byte.

The served step holds its first step until the service has opened every
client's stream (so each run is measured under its whole load) and the
training time is the span from the first step's ``StepEnded`` to the last's,
read from the run's ``events.jsonl``. Meanwhile a probe sends ``GET
/runs/{key}`` every 20 ms and times the replies. Printed: ``train_seconds``
(median of the rounds, with the spread), its ratio to ``0 clients`` of the
same round (target >= 0.95) and the GET latency p50/p99/max under load
(target max <= 100 ms), counted from the first reply that shows a step done;
the GETs before it, answered while the service still takes in the clients'
connections (200 at once), are shown in a column of their own, without a
target. Counts are checked before anything is printed: every
run completed all its steps, every active client got the run's
``TrainEnded``.

``--profile DIR`` also records the served process with py-spy (if installed)
during the ``200 stalled`` runs and writes ``DIR/<backend>.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_count, machine, med, print_table, run_main, spread, verdict

ROOT = Path(__file__).resolve().parent.parent
STEP_S, PROBE_S = 0.001, 0.02
LOADS = {"0 clients": ("none", 0), "50 active": ("active", 50), "200 stalled": ("stalled", 200)}
RATIO_TARGET, LATENCY_TARGET = 0.95, 0.100


# -- the served side (a child process) ------------------------------------------------


def serve(backend: str, output_dir: str) -> None:
    """The example's service with one more step, ``held``: the toy step, whose first
    step waits until the service has opened ``params.clients`` event streams."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_service", ROOT / "examples/service.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    opened: dict[str, int] = {}

    class Service(mod.Service):  # type: ignore[misc,name-defined]
        async def open_stream(self, run: Any) -> Any:
            stream = await super().open_stream(run)
            opened[run.key] = opened.get(run.key, 0) + 1
            return stream

    async def held(state: Any, step_idx: int) -> dict[str, float]:
        if step_idx == 0:
            want = int(state.ctx.run_config.get("clients", 0))
            while opened.get(state.ctx.run_key, 0) < want:
                await anyio.sleep(0.005)
        return await mod.toy_step(state, step_idx)  # type: ignore[no-any-return]

    app = mod.create_app(Service(output_dir, steps={"toy": mod.toy_step, "held": held}))

    sys.exit(
        anyio.run(partial(mod.serve_until_signal, app, backend=backend, port=0), backend=backend)
    )


# -- the clients (this process) ---------------------------------------------------------


def _ask(host: str, key: str) -> bytes:
    return f"GET /runs/{key}/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


async def _active(host: str, port: int, key: str, got: list[int]) -> None:
    """An SSE client that reads everything, until the run's TrainEnded."""
    async with await anyio.connect_tcp(host, port) as conn:
        await conn.send(_ask(host, key))
        tail = b""
        while True:
            try:
                chunk = await conn.receive(65536)
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return
            if b"event: TrainEnded" in tail + chunk:
                got.append(1)
                return
            tail = chunk[-32:]


def _stalled(host: str, port: int, key: str, n: int) -> list[socket.socket]:
    """``n`` raw sockets that ask for the stream and never read."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, port))
        s.sendall(_ask(host, key))
        socks.append(s)
    return socks


def _probe(host: str, port: int, key: str, latencies: list[float], opening: list[float]) -> str:
    """GET /runs/{key} every 20 ms until the run has ended, each reply timed: in
    ``opening`` until a reply shows a step done (the service still taking in the
    clients' connections, all at once), then in ``latencies`` (under their load)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        while True:
            t0 = time.perf_counter()
            conn.request("GET", f"/runs/{key}")
            reply = json.loads(conn.getresponse().read())
            took = time.perf_counter() - t0
            (latencies if latencies or reply["steps_completed"] else opening).append(took)
            if reply["status"] != "running":
                return str(reply["status"])
            time.sleep(PROBE_S)
    finally:
        conn.close()


def _train_seconds(run_dir: Path, num_steps: int) -> float:
    """From the first step's StepEnded to the last's (the hold before is left out)."""
    times: dict[int, float] = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        row = json.loads(line)
        event = row.get("event") if isinstance(row, dict) else None
        if isinstance(event, dict) and event.get("type") == "StepEnded":
            times[int(event["step"])] = float(event["ts"])
    check_count("steps completed", len(times), num_steps)
    return times[num_steps - 1] - times[0]


async def one_run(
    url: str, out: Path, load: str, key: str, num_steps: int
) -> tuple[float, list[float], list[float]]:
    kind, n = LOADS[load]
    host, port = url.removeprefix("http://").split(":")
    port_n = int(port)
    latencies: list[float] = []
    opening: list[float] = []
    got: list[int] = []
    socks: list[socket.socket] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        request = {
            "run_key": key,
            "step": "held",
            "num_steps": num_steps,
            "params": {"delay": STEP_S, "clients": n},
        }
        created = await client.post("/runs", json=request)
        assert created.status_code == 201, created.text
        try:
            async with anyio.create_task_group() as tg:
                if kind == "active":
                    for _ in range(n):
                        tg.start_soon(_active, host, port_n, key, got)
                elif kind == "stalled":
                    socks = await anyio.to_thread.run_sync(_stalled, host, port_n, key, n)
                # a thread of its own: the clients' reading does not delay the probe
                status = await anyio.to_thread.run_sync(
                    _probe, host, port_n, key, latencies, opening
                )
                assert status == "completed", status
        finally:
            for s in socks:
                s.close()
    if kind == "active":
        check_count(f"{load}: clients that got TrainEnded", len(got), n)
    return _train_seconds(out / key, num_steps), latencies, opening


@contextlib.contextmanager
def served(backend: str, out: Path, profile: Path | None) -> Any:
    cmd = [sys.executable, __file__, "--serve", backend, str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        said = proc.stdout.readline().strip()  # "serving on http://... (Ctrl-C to stop)"
        assert said.startswith("serving on http://"), f"the served process said {said!r}"
        url = said.split()[2]
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Profiler:
    """py-spy record of the served process while the stalled runs go (if installed)."""

    def __init__(self, pid: int, path: Path | None) -> None:
        self.pid, self.path = pid, path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        spy = shutil.which("py-spy")
        if self.path is not None and spy is not None and self.proc is None:
            cmd = [spy, "record", "--format", "raw", "-r", "200", "--threads", "--nonblocking"]
            cmd += ["-o", str(self.path), "-p", str(self.pid)]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)  # attached
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
            self.proc = None


def measure(args: argparse.Namespace, backend: str, tmp: Path) -> dict[str, Any]:
    out = tmp / backend
    ratios: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    lat: dict[str, list[float]] = {}
    first: dict[str, list[float]] = {}  # GETs while the clients' connections open
    profile = None
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        profile = args.profile / f"{backend}.txt"
    with served(backend, out, profile) as (url, proc):
        for r in range(args.repeats):
            base = 0.0
            for load in LOADS:
                spy = Profiler(proc.pid, profile if load == "200 stalled" and r == 0 else None)
                with spy:
                    s, latencies, opening = anyio.run(
                        one_run, url, out, load, f"r{r}-{load.split()[0]}", args.steps,
                        backend="asyncio",
                    )  # fmt: skip
                base = base or s
                seconds.setdefault(load, []).append(s)
                ratios.setdefault(load, []).append(base / s)
                lat.setdefault(load, []).extend(latencies)
                first.setdefault(load, []).extend(opening)
    return {"seconds": seconds, "ratios": ratios, "latency": lat, "opening": first}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="rounds (median of these)")
    ap.add_argument("--steps", type=int, default=3000, help="steps per run")
    ap.add_argument("--backend", default="both", choices=("asyncio", "trio", "both"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round")
    ap.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    ap.add_argument("--serve", nargs=2, metavar=("BACKEND", "DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(*args.serve)
        return
    if args.quick:  # the run stays long: 200 clients filling their sockets is its start
        args.repeats = 1
    backends = ("asyncio", "trio") if args.backend == "both" else (args.backend,)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="evsys-bench-svc-") as tmp:
        for backend in backends:
            results[backend] = measure(args, backend, Path(tmp))
    print(f"bench_services: {machine()}")
    print(
        f"command: python benchmarks/bench_services.py {' '.join(sys.argv[1:])}".rstrip()
        + f"   ({args.repeats} rounds, {args.steps} steps of {STEP_S * 1e3:.0f} ms;"
        f" {time.perf_counter() - started:.0f} s)"
    )
    rows = []
    failed = []
    for backend, res in results.items():
        for load in LOADS:
            secs, ratio = res["seconds"][load], res["ratios"][load]
            lats = res["latency"].get(load)
            cells = ["-", "-", "-"]
            if lats:
                cells = [f"{pct(lats, q) * 1e3:.1f}" for q in (0.5, 0.99, 1.0)]
                if max(lats) > LATENCY_TARGET:
                    failed.append(f"{backend} {load}: GET max {max(lats) * 1e3:.0f} ms")
            if med(ratio) < RATIO_TARGET:
                failed.append(f"{backend} {load}: ratio {med(ratio):.3f}")
            rows.append(
                [
                    f"{backend}, {load}",
                    f"{med(secs):.2f} ({spread(secs)})",
                    f"{med(ratio):.3f}",
                    *cells,
                    f"{max(res['opening'].get(load) or [0.0]) * 1e3:.0f}",
                ]
            )
    print_table(
        [
            "backend, load",
            "train_seconds",
            "x 0 clients",
            "GET p50 ms",
            "p99 ms",
            "max ms",
            "GET max ms while clients connect",
        ],
        rows,
    )
    word = verdict(not failed, "; ".join(failed) or "services")
    print(
        f"targets: train_seconds ratio >= {RATIO_TARGET} of 0 clients; GET latency max <= "
        f"{LATENCY_TARGET * 1e3:.0f} ms: {word}" + (f": {'; '.join(failed)}" if failed else "")
    )


if __name__ == "__main__":
    run_main(main)
