"""What one rank of a ``torch.distributed`` test job runs (imported by each spawned rank).

``rank_main`` joins a gloo process group on loopback, runs a hand-written loop of
``steps`` steps through a ``Session`` with a ``TorchDistributedCoordinator``, and
writes what it saw to ``<out>/rank<r>.json``. Light imports at the top: torch is
imported in the rank, where it is needed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import evsys_async as ev
from tests.integrations.helpers import Recorder, StopAt


def rank_main(rank: int, world: int, port: int, out: str, scenario: str) -> None:
    """One rank. ``scenario``: ``stop`` (rank 1 asks to stop on its step 5; rank 2 is
    slower), ``die`` (rank 3's process dies after its step 4) or ``loop`` (the same stop,
    through a ``TrainingLoop``)."""
    import torch.distributed as dist

    from evsys_async.transports import TorchDistributedCoordinator

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    coordinator = TorchDistributedCoordinator(interval=0.02, timeout=60.0, finish_timeout=30.0)
    result: dict[str, Any] = {"rank": coordinator.rank, "world_size": coordinator.world_size}
    rec = Recorder()
    callbacks: list[ev.Callback] = [rec]
    if rank == 1:
        callbacks.append(StopAt(5))
    if scenario == "loop":
        result.update(_loop(rank, out, coordinator, callbacks))
    else:
        result.update(_session(rank, out, scenario, coordinator, callbacks))
    result["steps"] = sorted(rec.steps())
    result["decision"] = None if coordinator.decision is None else coordinator.decision.step
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


#: steps a rank runs at most: with a dying rank, far more than the others need to
#: notice it (40 fast steps took 0.1 s, which a loaded machine's notice could miss)
STEPS = {"die": 1000}


def _pace(rank: int, step: int, scenario: str) -> None:
    time.sleep(0.03 if rank == 2 else 0.002)  # rank 2 is the slow one
    if scenario == "die" and rank == 3 and step == 4:
        os._exit(7)


def _session(
    rank: int, out: str, scenario: str, coordinator: Any, callbacks: list[ev.Callback]
) -> dict[str, Any]:
    with ev.Session(
        callbacks, output_dir=out, run_key="job", coordinator=coordinator, drain_timeout=20
    ) as session:
        for step in range(STEPS.get(scenario, 40)):
            _pace(rank, step, scenario)
            session.step_ended(step, {"loss": float(step)})
            if session.should_stop:
                break
    a = session.artifacts
    assert a is not None
    return {"status": a.status, "reason": a.stop_reason, "stop_rank": session.stop_rank}


def _loop(rank: int, out: str, coordinator: Any, callbacks: list[ev.Callback]) -> dict[str, Any]:
    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        _pace(rank, step_idx, "loop")
        return {"loss": float(step_idx)}

    loop = ev.TrainingLoop(
        step,
        num_steps=40,
        output_dir=out,
        run_key="loop",
        callbacks=callbacks,
        coordinator=coordinator,
        drain_timeout=20,
    )
    a = loop.run_sync()
    return {"status": a.status, "reason": a.stop_reason, "stop_rank": None}
