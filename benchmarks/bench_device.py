"""A step whose metrics live on a device: the training thread never waits for it.

Run: ``python benchmarks/bench_device.py`` (about a minute; ``--quick`` for a
smoke run, ``--backend trio``).

Part 1, everywhere: a stand-in device tensor (``OnDevice``: ``device.type`` is
``"cuda"``, ``detach``, ``clone``, and a ``float()`` that waits 1 ms, as a
GPU's queue draining). Each row is a ``TrainingLoop`` whose step takes 2 ms
(``time.sleep``: the CPU side of a GPU step), against the same loop whose step
returns plain floats, measured in the same run (rounds interleave every
scenario in a rotated order; medians over the rounds):

* ``def, on device`` / ``async, on device`` — the step returns the stand-in;
  the loop converts it off the training thread. Target: >= 0.95x the floats
  row's steps/s.
* ``def, float() in the step`` — what converting on the training thread costs:
  the step calls ``float()`` on its value itself (today's ``.item()`` a step).

Steps/s is over the whole ``run()`` (the shutdown's wait for the last
conversions included). Every run's ``StepEnded`` values are counted and
checked before anything is printed.

Part 2, with torch on CUDA only: a small MLP step on the GPU returning its loss
as a tensor, beside the same step calling ``loss.item()`` and beside a plain
Python loop calling ``.item()`` every step. Without a CUDA device it prints
"no CUDA device" and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_count, fmt, machine, med, print_table, run_main, spread, verdict

import evsys_async as ev

STEP_SECONDS = 0.002


class _Cuda:
    type = "cuda"


class OnDevice:
    """A 0-d "CUDA tensor": its ``float()`` waits 1 ms for the device."""

    device = _Cuda()

    def __init__(self, value: float) -> None:
        self.value = value

    def detach(self) -> OnDevice:
        return self

    def clone(self) -> OnDevice:
        return OnDevice(self.value)

    def __float__(self) -> float:
        time.sleep(0.001)
        return self.value


class Count(ev.Callback):
    """Counts the steps' events and checks each value."""

    def __init__(self) -> None:
        self.n = 0
        self.wrong = 0

    async def on_step_end(self, state: ev.LoopState, step_idx: int, b: Any, metrics: Any) -> None:
        self.n += 1
        self.wrong += metrics.get("loss") != step_idx / 2


def _on_device(state: Any, step_idx: int) -> dict[str, Any]:
    time.sleep(STEP_SECONDS)
    return {"loss": OnDevice(step_idx / 2)}


def _floats(state: Any, step_idx: int) -> dict[str, Any]:
    time.sleep(STEP_SECONDS)
    return {"loss": step_idx / 2}


def _inline(state: Any, step_idx: int) -> dict[str, Any]:
    time.sleep(STEP_SECONDS)
    return {"loss": float(OnDevice(step_idx / 2))}  # the training thread waits


def _as_async(fn: Callable[[Any, int], Any]) -> Callable[..., Any]:
    async def step(state: Any, step_idx: int) -> Any:
        return fn(state, step_idx)

    return step


async def steps_per_second(step: Callable[..., Any], n: int, tmp: Path) -> float:
    count = Count()
    loop = ev.TrainingLoop(
        step, num_steps=n, output_dir=tmp, run_key="b", overwrite=True, callbacks=[count]
    )
    t0 = time.perf_counter()
    art = await loop.run()
    wall = time.perf_counter() - t0
    if art.status != "completed":
        raise AssertionError(f"run ended {art.status}")
    check_count("StepEnded", count.n, n)
    check_count("wrong values", count.wrong, 0)
    return n / wall


def plan(n: int, tmp: Path) -> list[tuple[str, Callable[[], Any]]]:
    return [
        ("def, floats", lambda: steps_per_second(_floats, n, tmp)),
        ("def, on device", lambda: steps_per_second(_on_device, n, tmp)),
        ("def, float() in the step", lambda: steps_per_second(_inline, n, tmp)),
        ("async, floats", lambda: steps_per_second(_as_async(_floats), n, tmp)),
        ("async, on device", lambda: steps_per_second(_as_async(_on_device), n, tmp)),
    ]


async def rounds(repeats: int, n: int, tmp: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for rnd in range(repeats):
        todo = plan(n, tmp)
        shift = rnd % len(todo)
        for key, thunk in todo[shift:] + todo[:shift]:
            out.setdefault(key, []).append(await thunk())
    return out


def stand_in_table(res: dict[str, list[float]]) -> None:
    rows = []
    for key, base, target in [
        ("def, on device", "def, floats", 0.95),
        ("def, float() in the step", "def, floats", None),
        ("async, on device", "async, floats", 0.95),
    ]:
        ratio = med([a / b for a, b in zip(res[key], res[base], strict=True)])
        met = "" if target is None else verdict(ratio >= target, key, words=("yes", "no"))
        rows.append(
            [
                key,
                base,
                fmt(med(res[key])),
                spread(res[key]),
                fmt(med(res[base])),
                f"{ratio:.3f}",
                "" if target is None else f">= {target}",
                met,
            ]
        )
    print_table(
        [
            "scenario",
            "baseline",
            "steps/s",
            "spread",
            "baseline steps/s",
            "x base",
            "target",
            "met",
        ],
        rows,
        title=f"stand-in device tensor, {STEP_SECONDS * 1e3:.0f} ms steps",
    )


def torch_part(repeats: int, n: int, tmp: Path, backend: str) -> None:
    try:
        import torch
    except ImportError:
        print("\ntorch on CUDA: torch is not installed; no CUDA device to measure")
        return
    if not torch.cuda.is_available():
        print("\ntorch on CUDA: no CUDA device")
        return
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1)
    ).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(256, 1024, device="cuda")

    def train_step() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        return loss

    def tensor_step(state: Any, i: int) -> dict[str, Any]:
        return {"loss": train_step()}

    def item_step(state: Any, i: int) -> dict[str, Any]:
        return {"loss": train_step().item()}

    def plain_item() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            train_step().item()
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t0)

    async def run(step: Callable[..., Any]) -> float:
        loop = ev.TrainingLoop(step, num_steps=n, output_dir=tmp, run_key="t", overwrite=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        art = await loop.run()
        torch.cuda.synchronize()
        check_count("steps", art.steps_completed, n)
        return n / (time.perf_counter() - t0)

    res: dict[str, list[float]] = {}
    for _ in range(repeats):
        res.setdefault("plain loop, .item()", []).append(plain_item())
        res.setdefault("evsys, tensor metric", []).append(
            anyio.run(run, tensor_step, backend=backend)
        )
        res.setdefault("evsys, .item() in step", []).append(
            anyio.run(run, item_step, backend=backend)
        )
    base = res["plain loop, .item()"]
    print_table(
        ["scenario", "steps/s", "spread", "x plain .item() loop"],
        [
            [k, fmt(med(v)), spread(v), f"{med([a / b for a, b in zip(v, base, strict=True)]):.3f}"]
            for k, v in res.items()
        ],
        title=f"torch on CUDA ({torch.cuda.get_device_name()}), MLP 1024-4096-1, batch 256",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median of these)")
    ap.add_argument("--steps", type=int, default=300, help="steps per run")
    ap.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, few steps")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps = 1, 30
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="evsys-bench-device-") as tmp:
        res = anyio.run(rounds, args.repeats, args.steps, Path(tmp), backend=args.backend)
        print(f"bench_device: {machine()}")
        print(
            f"command: python benchmarks/bench_device.py {' '.join(sys.argv[1:])}".rstrip()
            + f"   (backend {args.backend}, {args.repeats} interleaved rounds, {args.steps} steps"
            f" per run; {time.perf_counter() - started:.0f} s)"
        )
        stand_in_table(res)
        torch_part(args.repeats, args.steps, Path(tmp), args.backend)


if __name__ == "__main__":
    run_main(main)
