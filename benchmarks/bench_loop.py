"""Loop cost: steps/s of a 2 ms step, bare and with callbacks, against plain sync dispatch.

Run: ``python benchmarks/bench_loop.py`` (about a minute and a half; ``--quick``
for a CI smoke run). With ``pip install -e '.[bench]'`` (torch,
pytorch-lightning, pytorch-ignite) the same scenarios also run on Lightning
and Ignite; without them those rows are skipped and the script says so.

Two steps, each 2 ms:

* ``async`` — ``async def step``: ``await anyio.sleep(0.002)`` (a step that
  awaits a remote trainer or an inference server; the event loop is free
  while it waits, so subscribers run then).
* ``def`` — ``def step``: ``time.sleep(0.002)`` (a step that holds its thread
  like a local forward/backward; evsys runs it in its dedicated step thread,
  the peers in the main thread).

Scenarios per step kind, all in one run, interleaved (each round runs every
scenario once, in a rotated order; figures are medians over the rounds and
the ratio/overhead columns are medians of the per-round pairs with that
round's bare loop):

* ``bare`` — no callback.
* ``slow 20 ms`` — one callback ``def on_step_end(...): time.sleep(0.02)``
  (Lossless: it falls behind and ``run()`` drains it at the end, so
  ``drain_seconds`` is large; with ``Latest()`` it skips to the newest step).
* ``16 async noop`` / ``16 def noop`` — 16 callbacks whose ``on_step_end``
  only counts its calls.
* ``plain ...`` — the same step in a plain ``for`` loop that calls the
  callbacks inline (what Lightning, Keras and HF do), ratio to the plain bare
  loop.

Every no-op callback counts its calls and the script checks the counts before
it prints (a figure counts only if every call happened). It asserts no timing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
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

STEP_S = 0.002
SLOW_S = 0.02
N_NOOP = 16


# -- callbacks -------------------------------------------------------------------------


class AsyncNoop(ev.Callback):
    def __init__(self) -> None:
        self.n = 0

    async def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.n += 1


class SyncNoop(ev.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.n += 1


class Slow(ev.Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        time.sleep(SLOW_S)
        self.n += 1


class SlowLatest(Slow):
    policy = ev.Latest()


class PlainNoop:
    """A Lightning-style callback object for the inline peer."""

    def __init__(self) -> None:
        self.n = 0

    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        self.n += 1


class PlainSlow(PlainNoop):
    def on_step_end(self, state: Any, step_idx: int, batch: Any, metrics: Any) -> None:
        time.sleep(SLOW_S)
        self.n += 1


# -- steps ------------------------------------------------------------------------------


async def async_step(state: Any, step_idx: int) -> dict[str, float]:
    await anyio.sleep(STEP_S)
    return {"loss": 1.0 / (step_idx + 1)}


def def_step(state: Any, step_idx: int) -> dict[str, float]:
    time.sleep(STEP_S)
    return {"loss": 1.0 / (step_idx + 1)}


STEPS: dict[str, Callable[..., Any]] = {"async": async_step, "def": def_step}


# -- one measurement -----------------------------------------------------------------------


class Result(dict[str, float]):
    """steps, steps_per_s, train_s, drain_s, wall_s for one run."""


async def run_evsys(step_kind: str, callbacks: list[Any], n_steps: int, tmp: Path) -> Result:
    loop = ev.TrainingLoop(
        STEPS[step_kind], num_steps=n_steps, output_dir=tmp / "run", callbacks=callbacks
    )
    gc.collect()
    t0 = time.perf_counter()
    art = await loop.run()
    wall = time.perf_counter() - t0
    if art.status != "completed" or art.steps_completed != n_steps:
        raise AssertionError(f"run ended {art.status} after {art.steps_completed}/{n_steps} steps")
    counted = [cb for cb in callbacks if not isinstance(cb, SlowLatest)]
    for cb in counted:
        check_count(f"{type(cb).__name__} ({step_kind} step)", cb.n, n_steps)
    for cb in callbacks:
        if isinstance(cb, SlowLatest):  # Latest coalesces: delivered + dropped cover every step
            h = art.callback_report[type(cb).__name__]  # type: ignore[index]
            check_count("SlowLatest delivered+dropped", h.delivered + h.dropped, n_steps)
    return Result(
        steps=n_steps,
        steps_per_s=n_steps / art.train_seconds,
        train_s=art.train_seconds,
        drain_s=art.drain_seconds,
        wall_s=wall,
    )


async def run_plain(step_kind: str, callbacks: list[Any], n_steps: int) -> Result:
    """The same step in a plain loop; callbacks called inline after each step."""
    state = object()
    gc.collect()
    t0 = time.perf_counter()
    for i in range(n_steps):
        if step_kind == "async":
            metrics = await async_step(state, i)
        else:
            metrics = def_step(state, i)
        for cb in callbacks:
            cb.on_step_end(state, i, None, metrics)
    dt = time.perf_counter() - t0
    for cb in callbacks:
        check_count(f"plain {type(cb).__name__}", cb.n, n_steps)
    return Result(steps=n_steps, steps_per_s=n_steps / dt, train_s=dt, drain_s=0.0, wall_s=dt)


# -- peers (optional: pip install -e '.[bench]') ----------------------------------------


def peers_available() -> dict[str, bool]:
    out = {}
    for name, mod in (("lightning", "pytorch_lightning"), ("ignite", "ignite.engine")):
        try:
            __import__(mod)
            out[name] = True
        except Exception:
            out[name] = False
    return out


def run_lightning(n_cb: int, slow: bool, n_steps: int) -> Result:
    import logging
    import warnings

    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    class Noop(pl.Callback):
        def __init__(self) -> None:
            self.n = 0

        def on_train_batch_end(self, *args: Any) -> None:
            self.n += 1

    class SlowCb(Noop):
        def on_train_batch_end(self, *args: Any) -> None:
            time.sleep(SLOW_S)
            self.n += 1

    class Timer(pl.Callback):
        t0 = t1 = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            if not self.t0:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.t1 = time.perf_counter()

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch: Any, idx: int) -> None:
            time.sleep(STEP_S)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cbs: list[Noop] = [SlowCb()] if slow else [Noop() for _ in range(n_cb)]
    timer = Timer()
    trainer = pl.Trainer(
        max_epochs=1,  # manual optimization never calls optimizer.step(): max_steps would not count
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer, *cbs],
    )
    data = DataLoader(TensorDataset(torch.zeros(n_steps, 1)), batch_size=1)
    gc.collect()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(None), contextlib.redirect_stdout(None):
        trainer.fit(Model(), data)
    wall = time.perf_counter() - t0
    for cb in cbs:
        check_count("lightning callback", cb.n, n_steps)
    # first batch start to last batch end: excludes Trainer setup, like train_seconds
    train = (timer.t1 - timer.t0) * n_steps / (n_steps - 1)
    return Result(
        steps=n_steps, steps_per_s=n_steps / train, train_s=train, drain_s=0.0, wall_s=wall
    )


def run_ignite(n_cb: int, slow: bool, n_steps: int) -> Result:
    from ignite.engine import Engine, Events

    def process(engine: Any, batch: Any) -> None:
        time.sleep(STEP_S)

    engine = Engine(process)
    counts = [0] * (1 if slow else n_cb)

    def make(i: int) -> Callable[[Any], None]:
        def handler(engine: Any) -> None:
            if slow:
                time.sleep(SLOW_S)
            counts[i] += 1

        return handler

    for i in range(len(counts) if (slow or n_cb) else 0):
        engine.add_event_handler(Events.ITERATION_COMPLETED, make(i))
    gc.collect()
    t0 = time.perf_counter()
    engine.run(range(n_steps), max_epochs=1)
    dt = time.perf_counter() - t0
    if slow or n_cb:
        for c in counts:
            check_count("ignite handler", c, n_steps)
    return Result(steps=n_steps, steps_per_s=n_steps / dt, train_s=dt, drain_s=0.0, wall_s=dt)


# -- the run ------------------------------------------------------------------------------

# (key, label, family, callbacks factory); family picks the bare loop a row is compared with
EVSYS = [
    ("bare", "bare loop", "evsys", list),
    ("slow", "slow 20 ms def cb (Lossless)", "evsys", lambda: [Slow()]),
    ("slow_latest", "slow 20 ms def cb (Latest)", "evsys", lambda: [SlowLatest()]),
    ("noop_async", "16 async noop cbs", "evsys", lambda: [AsyncNoop() for _ in range(N_NOOP)]),
    ("noop_def", "16 def noop cbs", "evsys", lambda: [SyncNoop() for _ in range(N_NOOP)]),
]
PLAIN = [
    ("plain_bare", "plain loop, bare", "plain", list),
    (
        "plain_noop",
        "plain loop, 16 noop inline",
        "plain",
        lambda: [PlainNoop() for _ in range(N_NOOP)],
    ),
    ("plain_slow", "plain loop, 20 ms cb inline", "plain", lambda: [PlainSlow()]),
]
PEERS = [
    ("lightning_bare", "Lightning bare", "lightning", (0, False)),
    ("lightning_noop", "Lightning 16 noop cbs", "lightning", (N_NOOP, False)),
    ("lightning_slow", "Lightning 20 ms cb", "lightning", (0, True)),
    ("ignite_bare", "Ignite bare", "ignite", (0, False)),
    ("ignite_noop", "Ignite 16 noop handlers", "ignite", (N_NOOP, False)),
    ("ignite_slow", "Ignite 20 ms handler", "ignite", (0, True)),
]


def plan(args: argparse.Namespace, peers: dict[str, bool]) -> list[tuple[str, Callable[[], Any]]]:
    """(key, thunk) for one round; thunks return a coroutine or a Result."""
    out: list[tuple[str, Callable[[], Any]]] = []
    tmp = Path(args.tmp)
    for kind in ("async", "def"):
        for key, _label, _fam, make in EVSYS:
            out.append(
                (
                    f"{kind}/{key}",
                    lambda k=kind, m=make: run_evsys(k, m(), args.steps, tmp),
                )
            )
        for key, _label, _fam, make in PLAIN:
            n = args.slow_steps if key == "plain_slow" else args.steps
            out.append((f"{kind}/{key}", lambda k=kind, m=make, n=n: run_plain(k, m(), n)))
    for key, _label, fam, (n_cb, slow) in PEERS:
        if not peers[fam]:
            continue
        n = args.slow_steps if slow else args.steps
        fn = run_lightning if fam == "lightning" else run_ignite
        out.append((f"def/{key}", lambda f=fn, c=n_cb, s=slow, n=n: f(c, s, n)))
    return out


async def one_round(
    args: argparse.Namespace, rnd: int, peers: dict[str, bool], results: dict[str, list[Result]]
) -> None:
    todo = plan(args, peers)
    shift = (rnd * 5) % len(todo)
    todo = todo[shift:] + todo[:shift]
    for key, thunk in todo:
        res = thunk()
        if not isinstance(res, Result):
            res = await res
        results.setdefault(key, []).append(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median of these)")
    ap.add_argument("--steps", type=int, default=100, help="steps per run")
    ap.add_argument("--slow-steps", type=int, default=25, help="steps for inline 20 ms runs")
    ap.add_argument("--backend", default="asyncio", choices=("asyncio", "trio"))
    ap.add_argument("--no-peers", action="store_true", help="skip Lightning/Ignite")
    ap.add_argument("--quick", action="store_true", help="CI smoke: 1 round, few steps")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.steps, args.slow_steps = 1, 20, 5
    peers = {"lightning": False, "ignite": False} if args.no_peers else peers_available()
    started = time.perf_counter()
    results: dict[str, list[Result]] = {}
    with tempfile.TemporaryDirectory(prefix="evsys-bench-loop-") as tmp:
        args.tmp = tmp
        for rnd in range(args.repeats):
            anyio.run(one_round, args, rnd, peers, results, backend=args.backend)
    wall = time.perf_counter() - started

    print(f"bench_loop: {machine()}")
    print(
        f"command: python benchmarks/bench_loop.py {' '.join(sys.argv[1:])}".rstrip()
        + f"   (backend {args.backend}, {args.repeats} interleaved rounds, {args.steps} steps"
        f" per run, {args.slow_steps} for inline 20 ms runs; {wall:.0f} s)"
    )
    missing = [p for p, ok in peers.items() if not ok]
    if missing:
        print(
            f"peers skipped (not installed or --no-peers): {', '.join(missing)}; "
            "pip install -e '.[bench]' to add them"
        )

    headers = [
        "step",
        "scenario",
        "steps/s",
        "spread",
        "x bare",
        "overhead µs/step",
        "train s",
        "drain s",
        "run() wall s",
    ]
    rows: list[list[str]] = []
    table = [*EVSYS, *PLAIN, *((k, lbl, fam, None) for k, lbl, fam, _ in PEERS)]
    ratios: dict[str, float] = {}
    overheads: dict[str, float] = {}
    for kind in ("async", "def"):
        for key, label, fam, _ in table:
            runs = results.get(f"{kind}/{key}")
            if not runs:
                continue
            bare_key = {"evsys": "bare", "plain": "plain_bare"}.get(fam, f"{fam}_bare")
            bares = results[f"{kind}/{bare_key}"]
            pair_ratio = [
                r["steps_per_s"] / b["steps_per_s"] for r, b in zip(runs, bares, strict=True)
            ]
            pair_over = [
                (r["train_s"] / r["steps"] - b["train_s"] / b["steps"]) * 1e6
                for r, b in zip(runs, bares, strict=True)
            ]
            ratios[f"{kind}/{key}"] = med(pair_ratio)
            overheads[f"{kind}/{key}"] = med(pair_over)
            sps = [r["steps_per_s"] for r in runs]
            rows.append(
                [
                    kind,
                    label,
                    fmt(med(sps), 1),
                    spread(sps),
                    "1" if key == bare_key else f"{med(pair_ratio):.3f}",
                    "-" if key == bare_key else fmt(med(pair_over), 1),
                    f"{med([r['train_s'] for r in runs]):.3f}",
                    f"{med([r['drain_s'] for r in runs]):.3f}",
                    f"{med([r['wall_s'] for r in runs]):.3f}",
                ]
            )
    print_table(
        headers,
        rows,
        title="steps/s of a 2 ms step (medians; x bare and overhead: medians of per-round pairs)",
    )

    evsys_vs_plain = {
        kind: med(
            [
                (e["train_s"] - p["train_s"]) / args.steps * 1e6
                for e, p in zip(results[f"{kind}/bare"], results[f"{kind}/plain_bare"], strict=True)
            ]
        )
        for kind in ("async", "def")
    }
    print(
        "\nevsys bare loop vs plain bare loop, µs/step: "
        + ", ".join(f"{k} step {v:+.1f}" for k, v in evsys_vs_plain.items())
    )
    print("\ntargets:")
    for kind in ("async", "def"):
        r = ratios[f"{kind}/slow"]
        print(
            f"  {kind} step, 20 ms cb: {r:.3f} of bare (target >= 0.98: {verdict(r >= 0.98, f'{kind} step, 20 ms cb >= 0.98 of bare')})"
        )
        o = overheads[f"{kind}/noop_async"]
        print(
            f"  {kind} step, 16 async noop: {o:+.1f} µs/step (target < 29: {verdict(o < 29, f'{kind} step, 16 async noop < 29 us')})"
        )
        o = overheads[f"{kind}/noop_def"]
        print(
            f"  {kind} step, 16 def noop: {o:+.1f} µs/step (target < 116: {verdict(o < 116, f'{kind} step, 16 def noop < 116 us')})"
        )


if __name__ == "__main__":
    run_main(main)
