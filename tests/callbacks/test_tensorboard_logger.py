"""tensorboard_logger: real event files read back with TensorBoard's own EventAccumulator
(scalars, wall times, the hparams plugin's records); its directory claimed as a run dir
is; its writes checked on a real full file system."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import evsys_async as ev
from evsys_async.callbacks import _tfevents
from evsys_async.callbacks._tfevents import masked_crc32c
from evsys_async.callbacks.tensorboard_logger import TensorBoardLoggerCallback
from evsys_async.events import EvalEnded, StepEnded, TrainEnded, TrainStarted
from tests.callbacks.helpers import WAIT, drive, make_state, read_tfevents, run_events

pytestmark = pytest.mark.anyio


def accumulator(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def points(log_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall_time)], as TensorBoard reads them."""
    acc = accumulator(log_dir)
    return {
        tag: [(s.step, s.value, s.wall_time) for s in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def timed_events(n: int, *, t0: float = 1_000_000.0, **config: Any) -> list[ev.Event]:
    """A run's events with known times: TrainStarted at t0, step i at t0 + i + 1."""
    out: list[ev.Event] = [TrainStarted(num_steps=n, ts=t0, config=config)]
    for i in range(n):
        out.append(StepEnded(step=i, num_steps=n, metrics={"loss": 1.0 / (i + 1)}, ts=t0 + i + 1))
        if i % 4 == 3:
            out.append(EvalEnded(step=i, eval_name="val", metrics={"acc": i / 10}, ts=t0 + i + 1.5))
    out.append(TrainEnded(status="completed", steps_completed=n, num_steps=n, ts=t0 + n + 2))
    return out


async def test_scalars_evals_and_the_recorded_wall_times(tmp_path: Path) -> None:
    cb = TensorBoardLoggerCallback()
    with anyio.fail_after(WAIT):
        sub = await drive(cb, make_state(tmp_path, num_steps=10), timed_events(10))
    log_dir = tmp_path / "r1" / "tensorboard"
    assert cb.run_log_dir == log_dir and cb.location == str(log_dir)
    got = points(log_dir)
    assert [(s, w) for s, _, w in got["loss"]] == [(i, 1_000_000.0 + i + 1) for i in range(10)]
    assert all(v == pytest.approx(1.0 / (s + 1), rel=1e-6) for s, v, _ in got["loss"])
    assert [(s, v, w) for s, v, w in got["val/acc"]] == [
        (3, pytest.approx(0.3), 1_000_004.5),
        (7, pytest.approx(0.7), 1_000_008.5),
    ]
    assert sub.stats().failed == 0 and cb.degraded is None


async def test_log_every_keeps_the_last_step_and_every_eval_and_prefix_names(
    tmp_path: Path,
) -> None:
    """A run stopped after step 9 of 20, log_every=4: steps 3 and 7 by the cadence, 9 as
    the last that ran; every eval; each name behind the prefix."""
    events = [
        e for e in timed_events(20) if not (isinstance(e, StepEnded | EvalEnded) and e.step > 9)
    ]
    events[-1] = TrainEnded(status="stopped", steps_completed=10, num_steps=20)
    cb = TensorBoardLoggerCallback(log_every=4, prefix="train/")
    with anyio.fail_after(WAIT):
        await drive(cb, make_state(tmp_path, num_steps=20), events)
    got = points(tmp_path / "r1" / "tensorboard")
    assert sorted(got) == ["train/loss", "train/val/acc"]
    assert [s for s, _, _ in got["train/loss"]] == [3, 7, 9]
    assert [s for s, _, _ in got["train/val/acc"]] == [3, 7]


async def test_hyperparameters_through_the_hparams_plugin_and_hparams_yaml(tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import metadata

    config = {"lr": 0.1, "opt": {"name": "adam", "betas": [0.9, 0.99]}, "warm": True, "none": None}
    cb = TensorBoardLoggerCallback()
    events = timed_events(4, **config)
    events[-1] = TrainEnded(status="failed", steps_completed=4, num_steps=4, error="x")
    with anyio.fail_after(WAIT):
        await drive(cb, make_state(tmp_path, num_steps=4), events)
    log_dir = tmp_path / "r1" / "tensorboard"
    content = accumulator(log_dir).PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    hparams = {
        k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
        for k, v in start.hparams.items()
    }
    assert hparams == {
        "lr": 0.1,
        "opt/name": "adam",
        "opt/betas": "[0.9, 0.99]",
        "warm": True,
    }
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    from tensorboard.plugins.hparams import api_pb2

    assert end.status == api_pb2.STATUS_FAILURE
    assert yaml.safe_load((log_dir / "hparams.yaml").read_text()) == config


async def test_without_a_config_in_train_started_the_run_config_is_used(tmp_path: Path) -> None:
    state = make_state(tmp_path, num_steps=2)
    state.ctx.run_config = {"seed": 3}
    with anyio.fail_after(WAIT):
        await drive(TensorBoardLoggerCallback(), state, run_events(2))
    assert yaml.safe_load((tmp_path / "r1" / "tensorboard" / "hparams.yaml").read_text()) == {
        "seed": 3
    }


async def test_an_absolute_log_dir_is_claimed_as_a_run_dir(tmp_path: Path) -> None:
    """Two output dirs, one run key, one log_dir: two directories, never one merged run;
    a resume finds the one its run claimed; overwrite starts it afresh."""
    tb = tmp_path / "tb"

    async def run(out: str, **state_kw: Any) -> TensorBoardLoggerCallback:
        cb = TensorBoardLoggerCallback(log_dir=tb)
        start = state_kw.get("start_step", 0)
        events = [e for e in timed_events(6) if not (isinstance(e, StepEnded) and e.step < start)]
        await drive(cb, make_state(tmp_path / out, num_steps=6, **state_kw), events)
        return cb

    with anyio.fail_after(WAIT):
        first = await run("a")
        second = await run("b")
        assert (first.location, second.location) == (str(tb / "r1"), str(tb / "r1-1"))
        claims = json.loads((tmp_path / "b" / "r1" / "claims.json").read_text())
        assert claims == {str(tb): str(tb / "r1-1")}
        resumed = await run("b", start_step=4)
        assert resumed.location == str(tb / "r1-1")
        assert len(list((tb / "r1-1").glob("events.out.tfevents.*"))) == 2
        assert [s for s, _, _ in points(tb / "r1-1")["loss"]] == list(range(6))
        again = await run("c", overwrite=True)
    assert again.location == str(tb / "r1")
    assert len(list((tb / "r1").glob("events.out.tfevents.*"))) == 1  # emptied first


async def test_paths_expand_and_a_relative_log_dir_is_inside_the_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EVSYS_TB", "mine")
    monkeypatch.chdir(tmp_path)
    with anyio.fail_after(WAIT):
        home = TensorBoardLoggerCallback(log_dir="~/tb")
        await drive(home, make_state(tmp_path / "out", num_steps=2), run_events(2))
        relative = TensorBoardLoggerCallback(log_dir="logs/$EVSYS_TB")
        await drive(
            relative, make_state(tmp_path / "out", run_key="r2", num_steps=2), run_events(2)
        )
    assert home.location == str(tmp_path / "home" / "tb" / "r1")
    assert relative.location == str(tmp_path / "out" / "r2" / "logs" / "mine")
    assert not (tmp_path / "~").exists() and not (tmp_path / "logs").exists()
    with pytest.raises(ev.ConfigError, match=r"\$EVSYS_UNSET_VAR"):
        TensorBoardLoggerCallback(log_dir="$EVSYS_UNSET_VAR/tb")


async def test_a_resume_in_the_same_second_keeps_both_segments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from evsys_async.callbacks import _tfevents

    monkeypatch.setattr(_tfevents, "time", SimpleNamespace(time=lambda: 1_700_000_000.0))
    with anyio.fail_after(WAIT):
        await drive(
            TensorBoardLoggerCallback(), make_state(tmp_path, num_steps=6), timed_events(6)[:5]
        )
        resumed = [e for e in timed_events(6) if not (isinstance(e, StepEnded) and e.step < 2)]
        await drive(
            TensorBoardLoggerCallback(), make_state(tmp_path, num_steps=6, start_step=2), resumed
        )
    files = sorted((tmp_path / "r1" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2 and all(".1700000000." in f.name for f in files)
    assert [s for s, _, _ in points(tmp_path / "r1" / "tensorboard")["loss"]] == list(range(6))


async def test_benchmark_metrics_through_dispatch(tmp_path: Path) -> None:
    cb = TensorBoardLoggerCallback()
    state = make_state(tmp_path, num_steps=1)
    async with ev.EventBus() as bus:
        from evsys_async.callbacks._adapter import CallbackAdapter

        sub = CallbackAdapter(cb, state).subscribe(bus)
        with anyio.fail_after(10):  # setup has run once the first event it handles is handled
            await bus.publish_and_wait(StepEnded(step=0, num_steps=1, metrics={"loss": 1.0}))
        await ev.dispatch(
            [cb],
            "on_benchmark_eval",
            state.ctx,
            {"name": "b", "metrics": {"acc": 0.5, "n": "x"}},
            [],
            step=3,
        )
        assert await sub.aclose(10)
    assert read_tfevents(tmp_path / "r1" / "tensorboard") == [
        ("loss", 0, 1.0),
        ("eval/b/acc", 3, 0.5),
    ]


async def test_only_rank_zero_writes(tmp_path: Path) -> None:
    with anyio.fail_after(WAIT):
        await drive(
            TensorBoardLoggerCallback(), make_state(tmp_path, num_steps=2, rank=1), run_events(2)
        )
    assert not (tmp_path / "r1").exists()


async def test_a_replay_keeps_the_recorded_times(tmp_path: Path) -> None:
    """Replayed points carry the recorded events' times, not the replay's."""
    from evsys_async.events import Envelope, encode

    log = tmp_path / "events.jsonl"
    lines = [ev.transports.log_header(run_key="made")]
    lines += [encode(Envelope("bus", i, e)) for i, e in enumerate(timed_events(6, lr=0.5))]
    log.write_bytes(b"\n".join(lines) + b"\n")
    with anyio.fail_after(WAIT):
        report = await ev.replay(log, [TensorBoardLoggerCallback()], output_dir=tmp_path / "again")
    assert report.run_dir is not None
    got = points(report.run_dir / "tensorboard")
    assert [(s, w) for s, _, w in got["loss"]] == [(i, 1_000_000.0 + i + 1) for i in range(6)]
    assert [w for _, _, w in got["val/acc"]] == [1_000_004.5]


# -- writes checked, on a real file system that fills up ------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs mounted for the test (mount(2) through libc: no process), or a skip
    where this process may not mount."""
    where = tmp_path / "small"
    where.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", os.fsencode(where), b"tmpfs", 0, b"size=256k") != 0:
        pytest.skip(f"cannot mount a tmpfs here: {os.strerror(ctypes.get_errno())}")
    try:
        yield where
    finally:
        libc.umount2(os.fsencode(where), 2)  # MNT_DETACH


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory``; return the filler."""
    filler = directory / "filler"
    page = b"\0" * 4096
    with open(filler, "wb", buffering=0) as f:
        written = 1
        while written:
            try:
                written = f.write(page) or 0
            except OSError as exc:
                written = 0 if exc.errno == errno.ENOSPC else f.write(page)
    return filler


async def test_a_full_disk_holds_records_and_writes_them_in_order_when_space_is_back(
    small_fs: Path,
) -> None:
    cb = TensorBoardLoggerCallback()
    state = make_state(small_fs, num_steps=30)
    (small_fs / "r1" / "tensorboard").mkdir(parents=True)
    fill(small_fs / "r1")
    held: list[Any] = []

    def after(event: ev.Event) -> None:
        if isinstance(event, StepEnded) and event.step == 14:
            held.append(cb.degraded)
            (small_fs / "r1" / "filler").unlink()

    with anyio.fail_after(WAIT):
        await drive(cb, state, timed_events(30), wait_each=True, after_each=after)
    assert held[0] is not None and "held for a retry" in held[0].reason
    assert cb.degraded is None  # every record reached the file at last
    assert [s for s, _, _ in points(small_fs / "r1" / "tensorboard")["loss"]] == list(range(30))


async def test_past_the_bound_the_file_stops_and_the_loss_is_reported(
    small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evsys_async.callbacks import _tfevents

    monkeypatch.setattr(_tfevents, "DEFAULT_MAX_HELD", 5)
    cb = TensorBoardLoggerCallback()
    (small_fs / "r1" / "tensorboard").mkdir(parents=True)
    fill(small_fs / "r1")
    with anyio.fail_after(WAIT):
        await drive(cb, make_state(small_fs, num_steps=20), timed_events(20), wait_each=True)
    assert cb.degraded is not None
    assert cb.degraded.rows_lost > 5 and cb.degraded.missing_from_step == 0
    assert "No space left on device" in cb.degraded.reason


async def test_an_event_file_removed_during_the_run_is_reported(tmp_path: Path) -> None:
    cb = TensorBoardLoggerCallback()

    def after(event: ev.Event) -> None:
        if isinstance(event, StepEnded) and event.step == 3:
            shutil.rmtree(tmp_path / "r1" / "tensorboard")

    with anyio.fail_after(WAIT):
        await drive(
            cb, make_state(tmp_path, num_steps=8), timed_events(8), wait_each=True, after_each=after
        )
    assert cb.degraded is not None and "removed" in cb.degraded.reason
    assert cb.degraded.rows_lost >= 4 and cb.degraded.missing_from_step == 0


def test_missing_extra_fails_at_build_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import raises ImportError
    with pytest.raises(ev.MissingExtraError, match=r"pip install 'evsys-async\[tensorboard\]'"):
        TensorBoardLoggerCallback()
    with pytest.raises(
        ev.MissingExtraError,
        match="tensorboard_logger needs the optional dependency 'tensorboardX'",
    ):
        ev.build_callbacks([{"kind": "tensorboard_logger"}])


def test_config_checks_its_numbers() -> None:
    (cb,) = ev.build_callbacks(
        [{"kind": "tensorboard_logger", "params": {"log_every": 5, "prefix": "p"}}]
    )
    assert isinstance(cb, TensorBoardLoggerCallback) and (cb.log_every, cb.prefix) == (5, "p")
    with pytest.raises(ev.ConfigError, match="log_every must be >= 1"):
        ev.build_callbacks([{"kind": "tensorboard_logger", "params": {"log_every": 0}}])


@pytest.mark.slow
def test_import_evsys_async_does_not_import_extras() -> None:
    import subprocess

    code = "import sys, evsys_async as ev; ev.list_callbacks(); print(sorted(m for m in ('tensorboardX', 'wandb', 'mlflow') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@given(st.binary(max_size=300))
def test_each_records_crc_is_tensorboards(data: bytes) -> None:
    """The C CRC (google-crc32c, in the extra) masks as tensorboardX's pure Python one."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.record_writer import u32

    fast = masked_crc32c()
    assert fast.__module__ == _tfevents.__name__  # the C one: the extra installs it
    x = u32(crc32c(data))  # tensorboardX's table, whatever crc32c package is installed
    assert fast(data) == u32(((x >> 15) | u32(x << 17)) + 0xA282EAD8)
