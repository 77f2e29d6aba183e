"""mlflow: real tracking stores read back with MLflow's own client — a SQLite store in the
output dir, a server that is not there, and (slow) a real ``mlflow server`` stopped in the
middle of a run and started again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.callbacks.mlflow_logger import MlflowLoggerCallback
from evsys_async.events import EvalEnded, StepEnded, TrainEnded, TrainStarted
from tests.callbacks.helpers import WAIT, drive, make_state
from tests.servers import free_port

pytestmark = pytest.mark.anyio

pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite tracking store with MLflow's tables made once (the migrations take
    seconds); each test starts from a copy of it."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def out(tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An output dir whose default store (``mlflow.db``) exists; no MLflow environment."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copy(empty_store, root / "mlflow.db")
    return root


def client_of(path: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{path}")


def runs_of(path: Path, experiment: str) -> dict[str, Any]:
    """run name -> run, in the experiment of that name."""
    client = client_of(path)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, experiment
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id])}


def history(path: Path, run: Any, key: str) -> list[tuple[int, float, int]]:
    points = client_of(path).get_metric_history(run.info.run_id, key)
    return sorted((m.step, m.value, m.timestamp) for m in points)


def timed_events(n: int, *, t0: float = 1_000_000.0, **config: Any) -> list[ev.Event]:
    out: list[ev.Event] = [TrainStarted(num_steps=n, ts=t0, config=config)]
    for i in range(n):
        out.append(StepEnded(step=i, num_steps=n, metrics={"loss": 1.0 / (i + 1)}, ts=t0 + i + 1))
        if i % 4 == 3:
            out.append(EvalEnded(step=i, eval_name="val", metrics={"acc": i / 10}, ts=t0 + i + 1.5))
    out.append(TrainEnded(status="completed", steps_completed=n, num_steps=n, ts=t0 + n + 2))
    return out


class Acc:
    name, run_every = "val", 5

    async def evaluate(self, state: ev.LoopState, step_idx: int) -> dict[str, float]:
        return {"acc": step_idx / 100}


async def loss(state: ev.LoopState, step_idx: int) -> dict[str, float]:
    return {"loss": 1.0 / (step_idx + 1)}


async def test_a_run_into_the_sqlite_store_in_its_output_dir(out: Path) -> None:
    cb = MlflowLoggerCallback(tags={"team": "x"})
    loop = ev.TrainingLoop(
        loss,
        num_steps=12,
        output_dir=out,
        run_key="demo",
        config={"lr": 0.1, "opt": {"name": "adam", "betas": [0.9, 0.99]}},
        evaluators=[Acc()],
        callbacks=[cb],
    )
    with anyio.fail_after(WAIT):
        artifacts = await loop.run()
    assert artifacts.callback_report["mlflow"].ok, artifacts.callback_report
    assert cb.location == f"sqlite:///{out / 'mlflow.db'}"
    run = runs_of(out / "mlflow.db", "runs")["demo"]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "opt/name": "adam", "opt/betas": "[0.9, 0.99]"}
    tags = run.data.tags
    assert tags["team"] == "x" and tags["evsys.rank"] == "0" and tags["evsys.run_key"] == "demo"
    assert tags["evsys.version"] == ev.__version__
    assert [(s, v) for s, v, _ in history(out / "mlflow.db", run, "loss")] == [
        (i, pytest.approx(1.0 / (i + 1))) for i in range(12)
    ]
    assert [s for s, _, _ in history(out / "mlflow.db", run, "val/acc")] == [4, 9]
    assert loop.ctx.extras["mlflow_run_id"] == run.info.run_id


async def test_cadence_prefix_times_and_the_last_step(out: Path) -> None:
    """log_every=4 on a run stopped after step 9: steps 3, 7 and 9 (the last that ran),
    every eval; each point at its event's time; names behind the prefix; a name MLflow
    refuses is logged under a fitting one."""
    events = [
        e for e in timed_events(20) if not (isinstance(e, StepEnded | EvalEnded) and e.step > 9)
    ]
    events.insert(1, EvalEnded(step=0, eval_name="val", metrics={"odd(x)": 1.0}, ts=1_000_000.5))
    events[-1] = TrainEnded(status="stopped", steps_completed=10, num_steps=20)
    cb = MlflowLoggerCallback(log_every=4, prefix="train")
    with anyio.fail_after(WAIT):
        await drive(cb, make_state(out, num_steps=20), events)
    run = runs_of(out / "mlflow.db", "runs")["r1"]
    got = history(out / "mlflow.db", run, "train/loss")
    assert [(s, t) for s, _, t in got] == [
        (3, 1_000_004_000),
        (7, 1_000_008_000),
        (9, 1_000_010_000),
    ]
    assert [(s, t) for s, _, t in history(out / "mlflow.db", run, "train/val/acc")] == [
        (3, 1_000_004_500),
        (7, 1_000_008_500),
    ]
    assert "train/val/odd_x_" in run.data.metrics
    assert cb.degraded is None


async def test_the_tracking_uri_comes_from_the_environment(
    out: Path, tmp_path: Path, empty_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere.db"
    shutil.copy(empty_store, elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    cb = MlflowLoggerCallback()
    with anyio.fail_after(WAIT):
        await drive(cb, make_state(out, num_steps=3), timed_events(3))
    assert cb.location == f"sqlite:///{elsewhere}"
    assert [s for s, _, _ in history(elsewhere, runs_of(elsewhere, "mine")["r1"], "loss")] == [
        0,
        1,
        2,
    ]
    assert client_of(out / "mlflow.db").get_experiment_by_name("mine") is None


async def test_a_resume_continues_the_run_and_a_changed_param_is_reported(out: Path) -> None:
    events = timed_events(8, lr=0.1)
    with anyio.fail_after(WAIT):
        await drive(MlflowLoggerCallback(), make_state(out, num_steps=8), events[:5])
        resumed = [
            e for e in timed_events(8, lr=0.2) if not (isinstance(e, StepEnded) and e.step < 4)
        ]
        cb = MlflowLoggerCallback()
        await drive(cb, make_state(out, num_steps=8, start_step=4), resumed)
    runs = runs_of(out / "mlflow.db", "runs")
    assert list(runs) == ["r1"]  # one run, continued
    assert [s for s, _, _ in history(out / "mlflow.db", runs["r1"], "loss")] == list(range(8))
    assert runs["r1"].data.params == {"lr": "0.1"}  # MLflow keeps a param's first value
    assert cb.degraded is not None and "1 params refused" in cb.degraded.reason
    assert cb.degraded.rows_lost == 0


async def test_an_experiments_arms_are_parent_runs_with_their_runs_nested(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The experiment's own dir names the MLflow experiment; each arm is a parent run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    arms = [ev.Arm(name, loss, params={"arm_lr": lr}) for name, lr in (("a", 0.1), ("b", 0.2))]
    experiment = ev.Experiment(
        "sweep",
        arms,
        num_steps=3,
        repeats=2,
        output_dir=out,
        callbacks=[MlflowLoggerCallback()],
    )
    with anyio.fail_after(WAIT * 2):
        await experiment.run()
    runs = runs_of(out / "mlflow.db", "sweep")
    assert sorted(runs) == ["a", "a-r0", "a-r1", "b", "b-r0", "b-r1"]
    for arm in ("a", "b"):
        parent = runs[arm]
        assert parent.data.tags["evsys.parent"] == "true" and parent.info.status == "FINISHED"
        for repeat in (0, 1):
            child = runs[f"{arm}-r{repeat}"]
            assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert child.data.params["arm"] == arm and child.data.params["repeat"] == str(repeat)


async def test_an_unreachable_server_never_blocks_and_is_reported_degraded(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://127.0.0.1:{free_port()}"
    cb = MlflowLoggerCallback(tracking_uri=url, finish_timeout=1.0, max_buffered=6)
    events = timed_events(10)
    with anyio.fail_after(WAIT):
        sub = await drive(cb, make_state(out, num_steps=10), events)
    assert sub.stats().delivered == len(events)  # every hook returned at once
    assert cb.degraded is not None
    assert cb.degraded.rows_lost == 12  # 10 losses and 2 accs: none was sent
    assert cb.degraded.missing_from_step == 0
    assert cb.degraded.reason.startswith("12 metrics not sent")


async def test_a_replay_keeps_the_recorded_times(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replayed points carry the recorded events' times, not the replay's."""
    from evsys_async.events import Envelope, encode

    log = out.parent / "events.jsonl"
    lines = [ev.transports.log_header(run_key="made")]
    lines += [encode(Envelope("bus", i, e)) for i, e in enumerate(timed_events(6, lr=0.5))]
    log.write_bytes(b"\n".join(lines) + b"\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    with anyio.fail_after(WAIT):
        report = await ev.replay(log, [MlflowLoggerCallback()], output_dir=out.parent / "again")
    assert report.run_dir is not None
    run = runs_of(out / "mlflow.db", "again")["made"]
    got = history(out / "mlflow.db", run, "loss")
    assert [(s, t) for s, _, t in got] == [(i, 1_000_000_000 + (i + 1) * 1000) for i in range(6)]
    assert run.data.params == {"lr": "0.5"}


# -- the real server, stopped and started again (slow: two processes) -----------------


class Server:
    """``mlflow server`` on a loopback port, its store a SQLite file that outlives it."""

    def __init__(self, store: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store, self.log = store, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        tmp = self.store.parent / "server-tmp"  # its lock files, not in the suite's temp dir
        tmp.mkdir(exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port),
                 "--backend-store-uri", f"sqlite:///{self.store}", "--workers", "1"],
                stdout=log, stderr=log, start_new_session=True, env={**os.environ, "TMPDIR": str(tmp)},
            )  # fmt: skip
        self._wait_until(up=True)

    def stop(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(60)
        self._wait_until(up=False)

    def _wait_until(self, *, up: bool) -> None:
        """Another process: nothing to wait on but its answer, so ask until it changes."""
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2).close()
                answered = True
            except OSError:
                answered = False
            if answered == up:
                return
            assert self.proc is not None and (not up or self.proc.poll() is None), (
                self.log.read_text(errors="replace")[-2000:]
            )
            time.sleep(0.2)
        raise AssertionError(f"mlflow server never {'came up' if up else 'went down'}")


@pytest.fixture
def server(tmp_path: Path, empty_store: Path) -> Iterator[Server]:
    shutil.copy(empty_store, tmp_path / "server.db")
    server = Server(tmp_path / "server.db", tmp_path / "server.log")
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(30)


@pytest.mark.slow
async def test_a_server_stopped_mid_run_gets_every_metric_once_it_is_back(
    out: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server goes down after step 10 and comes back at step 20, while the steps run
    on: the metrics of the steps between wait, and reach it in order."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    cb = MlflowLoggerCallback(tracking_uri=server.url, finish_timeout=60.0)

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        if step_idx == 10:
            server.stop()
        if step_idx == 20:
            server.start()
        return {"loss": float(step_idx)}

    loop = ev.TrainingLoop(
        step, num_steps=30, output_dir=out, run_key="outage", callbacks=[cb], drain_timeout=90
    )
    with anyio.fail_after(240):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    assert artifacts.callback_report["mlflow"].ok, artifacts.callback_report
    assert cb.degraded is None
    run = runs_of(server.store, "runs")["outage"]
    assert [(s, v) for s, v, _ in history(server.store, run, "loss")] == [
        (i, float(i)) for i in range(30)
    ]


def test_registered_built_from_config_and_the_missing_extra_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert "mlflow" in ev.list_callbacks()
    (cb,) = ev.build_callbacks([{"kind": "mlflow", "params": {"log_every": 5, "prefix": "p"}}])
    assert isinstance(cb, MlflowLoggerCallback) and (cb.log_every, cb.prefix) == (5, "p")
    with pytest.raises(ev.ConfigError, match="log_every must be >= 1"):
        ev.build_callbacks([{"kind": "mlflow", "params": {"log_every": 0}}])
    monkeypatch.setitem(sys.modules, "mlflow", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ev.MissingExtraError, match=r"pip install 'evsys-async\[mlflow\]'"):
        ev.build_callbacks([{"kind": "mlflow"}])
