"""The default main job: logistic regression trained by minibatch SGD, in pure Python.

``evsys-async run`` with no config runs :func:`demo_config`: a seeded
synthetic binary-classification dataset (a hidden linear rule plus label
noise), a model trained by minibatch SGD on the log loss, and an ``async``
evaluator, :class:`DemoAccuracy`, that reports ``pass_rate`` (held-out
accuracy) and the held-out ``loss`` every ``run_every`` steps. The built-in
callbacks write into ``runs/demo/``: ``metrics.csv``, ``metrics.jsonl``,
``events.jsonl``, ``summary.md``, and print a progress line. It needs nothing
beyond the package (no numpy) and finishes in about two seconds (it sleeps
10 ms a step so the progress can be watched): from a random start the
held-out loss falls from about 1.3 to under 0.3 while pass_rate climbs from
about 0.4 to over 0.9.

The step reads its hyperparameters from ``state.ctx.run_config`` (a config's
``params`` plus ``seed``); every one has a default:

==============  =======  ====================================================
``lr``          0.1      SGD step size
``batch_size``  32       examples per step
``n_features``  16       input dimension
``n_train``     2000     training examples
``n_test``      500      held-out examples
``noise``       0.3      std of the noise added to the hidden logit
``delay``       0.0      seconds slept per step (makes the progress watchable)
==============  =======  ====================================================
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from ._util.worker import DaemonWorker
from .config import RunConfig
from .evaluators import register_evaluator
from .state import LoopState

__all__ = ["DemoAccuracy", "DemoParams", "DemoTask", "demo_config", "train_step"]

Vector = tuple[float, ...]

DEFAULTS: dict[str, Any] = {
    "lr": 0.1,
    "batch_size": 32,
    "n_features": 16,
    "n_train": 2000,
    "n_test": 500,
    "noise": 0.3,
    "delay": 0.0,
}


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _dot(w: Sequence[float], x: Sequence[float]) -> float:
    return math.fsum(a * b for a, b in zip(w, x, strict=True))


@dataclass(frozen=True)
class DemoTask:
    """The dataset of one run, drawn from ``seed``: train and held-out splits."""

    x_train: list[Vector]
    y_train: list[int]
    x_test: list[Vector]
    y_test: list[int]

    @classmethod
    def make(
        cls, *, seed: int, n_features: int, n_train: int, n_test: int, noise: float
    ) -> DemoTask:
        rng = random.Random(seed)
        hidden = [rng.gauss(0.0, 1.0) for _ in range(n_features)]
        bias = rng.gauss(0.0, 0.5)

        def draw(n: int) -> tuple[list[Vector], list[int]]:
            xs = [tuple(rng.gauss(0.0, 1.0) for _ in range(n_features)) for _ in range(n)]
            ys = [int(_dot(hidden, x) + bias + rng.gauss(0.0, noise * 3) > 0) for x in xs]
            return xs, ys

        x_train, y_train = draw(n_train)
        x_test, y_test = draw(n_test)
        return cls(x_train, y_train, x_test, y_test)

    @classmethod
    def of(cls, state: LoopState) -> DemoTask:
        """The run's task, made on first use from ``state.ctx.run_config`` and kept
        in ``state.extras["demo_task"]``."""
        task = state.extras.get("demo_task")
        if task is None:
            p = _params(state)
            task = cls.make(
                seed=int(p["seed"]),
                n_features=int(p["n_features"]),
                n_train=int(p["n_train"]),
                n_test=int(p["n_test"]),
                noise=float(p["noise"]),
            )
            state.extras["demo_task"] = task
        assert isinstance(task, DemoTask)
        return task


class DemoParams(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The demo step's ``params``, checked when a config is loaded: a misspelt name
    (``dealy``) or a wrong type is an error naming it, before anything runs."""

    lr: float = DEFAULTS["lr"]
    batch_size: int = DEFAULTS["batch_size"]
    n_features: int = DEFAULTS["n_features"]
    n_train: int = DEFAULTS["n_train"]
    n_test: int = DEFAULTS["n_test"]
    noise: float = DEFAULTS["noise"]
    delay: float = DEFAULTS["delay"]


def _params(state: LoopState) -> dict[str, Any]:
    return {**DEFAULTS, "seed": 0, **state.ctx.run_config}


def _model(state: LoopState, n_features: int) -> tuple[Vector, float]:
    """The model, ``(weights, bias)``; at first a seeded random guess (so the
    held-out accuracy starts near chance and has somewhere to climb)."""
    model = state.model
    if model is None:
        rng = random.Random(f"{_params(state)['seed']}:init")
        return tuple(rng.gauss(0.0, 1.0) for _ in range(n_features)), 0.0
    weights, bias = model
    return weights, bias


def log_loss_and_accuracy(
    weights: Vector, bias: float, xs: Sequence[Vector], ys: Sequence[int]
) -> tuple[float, float]:
    """Mean log loss and accuracy of the model on ``(xs, ys)``."""
    loss = 0.0
    right = 0
    for x, y in zip(xs, ys, strict=True):
        p = min(max(_sigmoid(_dot(weights, x) + bias), 1e-12), 1 - 1e-12)
        loss -= math.log(p) if y else math.log(1 - p)
        right += int((p >= 0.5) == bool(y))
    return loss / len(xs), right / len(xs)


def train_step(state: LoopState, step_idx: int) -> dict[str, float]:
    """One SGD step on a minibatch; returns the minibatch's ``loss`` and the ``lr``.

    A plain ``def``: the loop runs it in the run's own step thread. The model,
    ``(weights, bias)``, is replaced (never mutated) in ``state.model``, so an
    evaluator reading it sees one consistent version.
    """
    p = _params(state)
    task = DemoTask.of(state)
    lr, batch_size = float(p["lr"]), int(p["batch_size"])
    weights, bias = _model(state, len(task.x_train[0]))
    rng = random.Random(f"{p['seed']}:{step_idx}")  # resumable: the batch depends on the step
    idx = [rng.randrange(len(task.x_train)) for _ in range(batch_size)]
    grad_w = [0.0] * len(weights)
    grad_b = 0.0
    loss = 0.0
    for i in idx:
        x, y = task.x_train[i], task.y_train[i]
        prob = min(max(_sigmoid(_dot(weights, x) + bias), 1e-12), 1 - 1e-12)
        loss -= math.log(prob) if y else math.log(1 - prob)
        err = prob - y
        for j, xj in enumerate(x):
            grad_w[j] += err * xj
        grad_b += err
    scale = lr / batch_size
    state.model = (
        tuple(w - scale * g for w, g in zip(weights, grad_w, strict=True)),
        bias - scale * grad_b,
    )
    if p["delay"]:
        time.sleep(float(p["delay"]))
    return {"loss": loss / batch_size, "lr": lr}


#: a step's ``Config`` is what a config's ``params`` are checked against (docs/config.md)
train_step.Config = DemoParams  # type: ignore[attr-defined]


@register_evaluator("demo_accuracy")
class DemoAccuracy:
    """Held-out ``pass_rate`` (accuracy) and ``loss`` of the demo model.

    ``async``: the scoring runs in a worker thread (as a call to an eval
    server would be awaited), so the event loop stays free meanwhile.
    """

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        name: str = "val"
        run_every: int = 20

    def __init__(self, name: str = "val", run_every: int = 20) -> None:
        if run_every < 0:
            raise ValueError(f"run_every must be >= 0 (0 = never), got {run_every}")
        self.name = name
        self.run_every = run_every
        self._worker: DaemonWorker | None = None

    async def evaluate(self, state: LoopState, step_idx: int) -> Mapping[str, float]:
        task = DemoTask.of(state)
        weights, bias = _model(state, len(task.x_test[0]))
        if self._worker is None:  # its own daemon thread: the loop stays free
            self._worker = DaemonWorker(f"evsys-demo-eval:{self.name}")
        loss, accuracy = await self._worker.call(
            log_loss_and_accuracy, weights, bias, task.x_test, task.y_test
        )
        return {"pass_rate": accuracy, "loss": loss}


def demo_config(
    *,
    name: str = "demo",
    output_dir: str = "runs",
    num_steps: int = 200,
    delay: float = 0.01,
    **params: Any,
) -> RunConfig:
    """The demo as a :class:`RunConfig` (``docs/config.md`` has the same as YAML).

    ``params`` override the step's hyperparameters (``lr=0.1``, ``delay=0.01``).
    """
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"demo_config: unknown params {unknown}; known: {sorted(DEFAULTS)}")
    return msgspec.convert(
        {
            "name": name,
            "output_dir": output_dir,
            "num_steps": num_steps,
            "step": "demo",
            "seed": 0,
            "params": {"delay": delay, **params},
            "evaluators": [{"kind": "demo_accuracy", "params": {"name": "val", "run_every": 20}}],
            "callbacks": [
                {"kind": "print_progress", "params": {"every": 20}},
                {"kind": "csv_metrics", "params": {"out_path": "metrics.csv"}},
                {"kind": "local_logger", "params": {"print_every": 0}},
                {
                    "kind": "early_stopping",
                    "params": {"metric": "pass_rate", "eval_name": "val", "patience": 5},
                },
            ],
        },
        RunConfig,
    )
