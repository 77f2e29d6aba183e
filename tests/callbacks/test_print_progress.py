"""print_progress: the original lines on a plain stream (lossless), one live bar on a TTY (Latest)."""

from __future__ import annotations

import io
from pathlib import Path

import anyio
import pytest

import evsys_async as ev
from evsys_async.callbacks._format import fmt_value as _fmt_value
from evsys_async.callbacks.print_progress import PrintProgressCallback
from tests.callbacks.helpers import WAIT, drive, make_state, run_events

pytestmark = pytest.mark.anyio


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.5, "0.5000"),
        (0.0, "0.0000"),
        (1e-3, "0.0010"),
        (9.99e-4, "9.99e-04"),
        (-2e-5, "-2.00e-05"),
        (999999.0, "999999.0000"),
        (1e6, "1.00e+06"),
        (-3e7, "-3.00e+07"),
        (3, "3.0000"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        ("text", "text"),
    ],
)
def test_fmt_value_is_the_seeds(value: object, text: str) -> None:
    assert _fmt_value(value) == text


async def test_plain_stream_lines_every_n_last_always_evals_on_their_own(tmp_path: Path) -> None:
    out = io.StringIO()
    cb = PrintProgressCallback(every=4, stream=out)
    assert not cb.tty
    assert isinstance(cb.policy, ev.Lossless)
    events = run_events(10, lambda i: {"loss": 1.0 / (i + 1), "lr": 1e-4}, evals={4: {"acc": 0.5}})
    with anyio.fail_after(WAIT):
        await drive(cb, make_state(tmp_path, num_steps=10), events)
    assert out.getvalue().splitlines() == [
        "[1/10] loss=1.0000 lr=1.00e-04",  # the first step, always
        "[4/10] loss=0.2500 lr=1.00e-04",  # after every 4th step, counted from 1
        "[5/10] eval val: acc=0.5000",
        "[8/10] loss=0.1250 lr=1.00e-04",
        "[10/10] loss=0.1000 lr=1.00e-04",  # the last step, always
    ]


async def test_keys_pick_and_order_the_cells(tmp_path: Path) -> None:
    out = io.StringIO()
    cb = PrintProgressCallback(keys=["lr", "missing", "loss"], stream=out)
    with anyio.fail_after(WAIT):
        await drive(
            cb,
            make_state(tmp_path, num_steps=2),
            run_events(2, lambda i: {"loss": 2.0, "lr": 0.1, "x": 1.0}),
        )
    assert out.getvalue().splitlines() == [
        "[1/2] lr=0.1000 loss=2.0000",
        "[2/2] lr=0.1000 loss=2.0000",
    ]


async def test_stopped_run_says_so(tmp_path: Path) -> None:
    out = io.StringIO()
    events = [
        *run_events(3)[:-1],
        ev.events.TrainEnded(
            status="stopped", steps_completed=3, num_steps=3, stop_reason="plateau"
        ),
    ]
    with anyio.fail_after(WAIT):
        await drive(PrintProgressCallback(stream=out), make_state(tmp_path, num_steps=3), events)
    assert out.getvalue().splitlines()[-1] == "stopped after 3 steps: plateau"


async def test_tty_draws_one_bar_subscribed_latest(tmp_path: Path) -> None:
    out = Tty()
    cb = PrintProgressCallback(stream=out)
    assert cb.tty
    assert isinstance(cb.policy, ev.Latest)
    events = run_events(50, lambda i: {"loss": float(i)}, evals={24: {"acc": 0.25}})
    with anyio.fail_after(WAIT):
        sub = await drive(cb, make_state(tmp_path, num_steps=50), events)
    text = out.getvalue()
    assert "50/50" in text
    assert "loss=49.0000" in text  # the newest step is always shown
    assert "[25/50] eval val: acc=0.2500" in text
    stats = sub.stats()
    assert stats.delivered + stats.dropped == len(events)
    assert cb._bar is None  # closed


async def test_only_rank_zero_prints(tmp_path: Path) -> None:
    out = io.StringIO()
    with anyio.fail_after(WAIT):
        await drive(
            PrintProgressCallback(stream=out),
            make_state(tmp_path, num_steps=3, rank=1),
            run_events(3),
        )
    assert out.getvalue() == ""


def test_built_from_config() -> None:
    (cb,) = ev.build_callbacks(
        [{"kind": "print_progress", "params": {"every": 5, "stream": "stderr"}}]
    )
    assert isinstance(cb, PrintProgressCallback)
    assert cb.every == 5
    with pytest.raises(ev.ConfigError, match="did you mean 'every'"):
        ev.build_callbacks([{"kind": "print_progress", "params": {"evry": 5}}])
    with pytest.raises(ev.ConfigError, match="every must be >= 1"):
        ev.build_callbacks([{"kind": "print_progress", "params": {"every": 0}}])
