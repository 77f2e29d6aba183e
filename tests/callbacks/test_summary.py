"""summary.md and its chart: the best value of each eval metric, the hyperparameters,
an SVG of the loss and each eval metric by step (parsed, and rendered by a real
browser where one is installed), and a resumed run counted whole."""

from __future__ import annotations

import itertools
import json
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import anyio
import pytest

from evsys_async.callbacks._chart import Series, sparkline, svg_chart
from evsys_async.callbacks.local_logger import LocalLoggerCallback
from evsys_async.events import Event, TrainEnded, TrainStarted
from tests.callbacks.helpers import WAIT, drive, make_state, run_events

pytestmark = pytest.mark.anyio

SVG = "{http://www.w3.org/2000/svg}"
CONFIG = {
    "lr": 0.1,
    "optimizer": {"name": "sgd", "momentum": 0.9},
    "callbacks": [
        {"kind": "early_stopping", "params": {"metric": "loss", "mode": "min", "eval_name": "val"}}
    ],
}


def the_run(n: int = 50, start: int = 0, config: dict | None = None) -> list[Event]:
    evals = {i: {"acc": min(i, 29) / 100, "loss": 1 + abs(i - 29) / 10} for i in range(9, n, 10)}
    events = run_events(n, lambda i: {"loss": 2.0 / (i + 1), "lr": 0.1}, evals=evals)
    events[0] = TrainStarted(num_steps=n, config=config if config is not None else CONFIG)
    if start:
        events = [events[0], *[e for e in events[1:] if getattr(e, "step", n) >= start]]
        events[-1] = TrainEnded(status="completed", steps_completed=n - start, num_steps=n)
    return events


async def test_summary_has_the_best_values_the_hyperparameters_and_a_chart(
    tmp_path: Path,
) -> None:
    state = make_state(tmp_path, num_steps=50)
    with anyio.fail_after(WAIT):
        await drive(LocalLoggerCallback(print_every=0), state, the_run())
    text = (state.run_dir / "summary.md").read_text(encoding="utf-8")
    assert "- steps: 50 of 50" in text
    # best: acc is maximised; val/loss minimised because early stopping watches it (min)
    assert "| val/acc | 0.2900 | 30 | max |" in text
    assert "| val/loss | 1.0000 | 30 | min |" in text
    assert "| loss | 50 | 0.0400 |" in text  # the last values, steps from 1
    assert "| lr | 0.1 |" in text and "| optimizer.name | sgd |" in text
    assert "| optimizer.momentum | 0.9 |" in text
    assert "![the training loss and eval metrics by step](summary.svg)" in text

    root = ET.parse(state.run_dir / "summary.svg").getroot()
    panels = {g.get("data-metric"): g for g in root.iter(f"{SVG}g")}
    assert list(panels) == ["loss", "val/acc", "val/loss"]  # the loss, then each eval metric
    frame = panels["loss"].find(f"{SVG}rect")
    assert frame is not None
    x0, y0 = float(frame.get("x", 0)), float(frame.get("y", 0))
    x1, y1 = x0 + float(frame.get("width", 0)), y0 + float(frame.get("height", 0))
    for name, count in (("loss", 50), ("val/acc", 5), ("val/loss", 5)):
        line = panels[name].find(f"{SVG}polyline")
        assert line is not None
        points = [tuple(map(float, p.split(","))) for p in line.get("points", "").split()]
        assert len(points) == count
        xs = [x for x, _ in points]
        assert xs == sorted(xs)
        top = float(panels[name].find(f"{SVG}rect").get("y", 0))  # type: ignore[union-attr]
        assert all(x0 <= x <= x1 + 0.1 for x in xs)
        assert all(top - 0.1 <= y <= top + (y1 - y0) + 0.1 for _, y in points)
    # the loss falls: its first point is the highest on the page (the smallest y)
    loss = panels["loss"].find(f"{SVG}polyline").get("points").split()  # type: ignore[union-attr]
    ys = [float(p.split(",")[1]) for p in loss]
    assert ys[0] == min(ys) and ys[-1] == max(ys)
    labels = {t.get("class"): [] for t in root.iter(f"{SVG}text")}
    for t in root.iter(f"{SVG}text"):
        labels[t.get("class")].append(t.text)
    assert labels["name"] == ["loss", "val/acc", "val/loss"]
    assert labels["xlabel"] == ["step"] * 3
    assert {"1", "50"} <= set(labels["xtick"])  # the step axis runs from 1 to 50
    assert "2.0000" in labels["ytick"] and "0.0400" in labels["ytick"]  # loss's range
    assert "0.2900" in labels["ytick"]  # acc's top


async def test_a_resumed_run_counts_the_whole_run(tmp_path: Path) -> None:
    first = make_state(tmp_path, num_steps=50)
    with anyio.fail_after(WAIT):
        await drive(LocalLoggerCallback(print_every=0), first, the_run()[:40])  # to step 30
        resumed = make_state(tmp_path, num_steps=50, step=30, start_step=30)
        await drive(LocalLoggerCallback(print_every=0), resumed, the_run(start=30))
    text = (resumed.run_dir / "summary.md").read_text(encoding="utf-8")
    assert "- steps: 50 of 50 (resumed at step 31)" in text
    assert "| val/acc | 0.2900 | 30 | max |" in text  # from before the resume
    root = ET.parse(resumed.run_dir / "summary.svg").getroot()
    loss = next(g for g in root.iter(f"{SVG}g") if g.get("data-metric") == "loss")
    assert len(loss.find(f"{SVG}polyline").get("points").split()) == 50  # type: ignore[union-attr]


async def test_log_every_thins_metrics_jsonl_not_the_event_log(tmp_path: Path) -> None:
    state = make_state(tmp_path, num_steps=10)
    with anyio.fail_after(WAIT):
        await drive(LocalLoggerCallback(print_every=0, log_every=3), state, the_run(10))
    rows = [json.loads(x) for x in (state.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 5, 8, 9]
    assert [r["step"] for r in rows if r["split"] == "val"] == [9]
    log = (state.run_dir / "events.jsonl").read_text().splitlines()
    assert sum('"StepEnded"' in x for x in log) == 10


def test_series_stay_bounded_and_spread() -> None:
    s = Series(cap=100)
    for i in range(100_000):
        s.add(i, float(i))
    assert 50 <= len(s.points) < 100
    steps = [p[0] for p in s.points]
    assert steps[0] == 0 and steps[-1] > 95_000 - s.stride
    gaps = {b - a for a, b in itertools.pairwise(steps)}
    assert gaps == {s.stride}


def test_sparkline() -> None:
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == "▁▂▃▄▅▆▇█"
    assert sparkline([5.0, 5.0]) == "▅▅"
    # 90 equal values in 32 shares: the means differ in their last bits, the line is flat
    assert sparkline([0.1] * 90) == "▅" * 32
    assert sparkline([0.0, 0.0]) == "▅▅"
    assert sparkline([float("nan")]) == ""
    assert len(sparkline(list(range(1000)), width=20)) == 20


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered RGB(A) rows of a PNG (8-bit, colour type 2 or 6)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytes(width * bpp)
    for y in range(height):
        f, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = bytes(line)
    return (
        width,
        height,
        [r[: width * bpp] for r in rows]
        if bpp == 3
        else [bytes(x for i, x in enumerate(r) if i % 4 != 3) for r in rows],
    )


@pytest.mark.slow
def test_the_chart_renders_in_a_real_browser(tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no headless Chromium installed (apt-get install chromium)")
    points = [(i, 2.0 / (i + 1)) for i in range(200)]
    evals = [(i, min(i, 99) / 100) for i in range(19, 200, 20)]
    svg = svg_chart([("loss", points), ("val/acc", evals)], title="demo: 200 of 200 steps")
    (tmp_path / "chart.svg").write_text(svg, encoding="utf-8")
    png = tmp_path / "chart.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={png}",
            "--window-size=640,480",
            (tmp_path / "chart.svg").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=90,
    )
    width, height, rows = _png_pixels(png.read_bytes())
    assert (width, height) == (640, 480)
    pixels = {row[i : i + 3] for row in rows for i in range(0, len(row), 3)}
    blue, red = bytes((0x1F, 0x77, 0xB4)), bytes((0xD6, 0x27, 0x28))  # the two lines

    def near(want: bytes) -> bool:
        return any(sum(abs(p - q) for p, q in zip(px, want, strict=True)) < 60 for px in pixels)

    assert near(blue) and near(red), "the lines were not drawn"
    dark = sum(1 for px in pixels if max(px) < 90)
    assert dark > 0, "no text or axes were drawn"
