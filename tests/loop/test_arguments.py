"""TrainingLoop's arguments (``loop/_arguments.py``) and its run directories.

A bad argument is refused when the loop is built, or when ``run()`` starts, naming the
allowed range or the fix; every run claims a new run dir unless asked to reuse it, and
none lies outside ``output_dir``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import anyio
import pytest

import evsys_async as ev
from tests.loop.helpers import WAIT, Acc, loss_step

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"num_steps": 0}, "num_steps must be an int >= 1"),
        ({"num_steps": 5, "save_every": -1}, "save_every must be >= 0"),
        ({"num_steps": 5, "eval_mode": "later"}, "eval_mode must be 'inline' or 'background'"),
        ({"num_steps": 5, "drain_timeout": 0}, "drain_timeout must be > 0"),
    ],
)
def test_bad_arguments_name_the_allowed_range(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        ev.TrainingLoop(loss_step, **kwargs)


async def test_start_step_out_of_range(tmp_path: Path) -> None:
    loop = ev.TrainingLoop(loss_step, num_steps=5, output_dir=tmp_path)
    with anyio.fail_after(WAIT):
        with pytest.raises(ValueError, match=r"start_step must be in \[0, 4\]"):
            await loop.run(start_step=5)


async def test_bad_hook_signature_is_caught_before_the_run(tmp_path: Path) -> None:
    class Wrong(ev.Callback):
        def on_step_end(self, state: ev.LoopState) -> None:  # type: ignore[override]
            pass

    loop = ev.TrainingLoop(loss_step, num_steps=5, output_dir=tmp_path, callbacks=[Wrong()])
    with anyio.fail_after(WAIT):
        with pytest.raises(
            TypeError, match=r"Wrong\.on_step_end.*cannot take the hook's arguments"
        ):
            await loop.run()


async def test_each_run_claims_a_new_dir_unless_asked_to_reuse_it(tmp_path: Path) -> None:
    class KeySeen(ev.Callback):
        key = ""

        def on_envelope(self, state: ev.LoopState, envelope: ev.Envelope) -> None:
            if isinstance(envelope.event, ev.events.TrainStarted):
                self.key = envelope.event.run_key

    keys = []
    with anyio.fail_after(WAIT):
        for _ in range(3):
            seen = KeySeen()
            loop = ev.TrainingLoop(
                loss_step, num_steps=2, output_dir=tmp_path, run_key="demo", callbacks=[seen]
            )
            artifacts = await loop.run()
            keys.append(loop.run_key)
            assert artifacts.run_dir == tmp_path / loop.run_key
            assert seen.key == loop.run_key  # the claimed key is the run key in events too
        assert keys == ["demo", "demo-1", "demo-2"]
        (tmp_path / "demo" / "mine.txt").write_text("an earlier run's file")
        loop = ev.TrainingLoop(
            loss_step, num_steps=2, output_dir=tmp_path, run_key="demo", overwrite=True
        )
        await loop.run()
        assert loop.run_key == "demo" and not (tmp_path / "demo" / "mine.txt").exists()  # afresh
        # no key: the config's name, else "run"
        loop = ev.TrainingLoop(
            loss_step, num_steps=1, output_dir=tmp_path, config={"name": "exp", "lr": 0.1}
        )
        assert (await loop.run()).run_dir == tmp_path / "exp"
        assert (
            await ev.TrainingLoop(loss_step, num_steps=1, output_dir=tmp_path).run()
        ).run_dir == tmp_path / "run"


@pytest.mark.parametrize("key", ["../x", "{tmp}/abs/x", "a/../../x", ".."])
def test_a_run_key_that_escapes_output_dir_is_refused(tmp_path: Path, key: str) -> None:
    key = key.format(tmp=tmp_path)  # an absolute path, inside tmp_path should it be written
    loop = ev.TrainingLoop(loss_step, num_steps=1, output_dir=tmp_path / "out", run_key=key)
    with pytest.raises(
        ValueError,
        match=r"would put the run's files outside output_dir .* a run key is a name inside it",
    ):
        loop.run_sync()
    assert not (tmp_path / "x").exists() and not (tmp_path / "abs").exists()


def test_config_is_the_runs_hyperparameters_and_contradictions_are_refused(tmp_path: Path) -> None:
    seen = {}

    def step(state: ev.LoopState, step_idx: int) -> dict[str, float]:
        seen.update(state.ctx.run_config)
        return {"loss": 1.0}

    ev.TrainingLoop(step, num_steps=1, output_dir=tmp_path, config={"lr": 0.5}).run_sync()
    assert seen == {"lr": 0.5}
    ctx = ev.LogContext(output_dir=tmp_path / "a", run_key="k", run_config={"lr": 0.1})
    with pytest.raises(ValueError, match=r"output_dir='.*b' contradicts ctx.output_dir='.*a'"):
        ev.TrainingLoop(step, num_steps=1, output_dir=tmp_path / "b", ctx=ctx)
    with pytest.raises(ValueError, match=r"run_key='other' contradicts ctx\.run_key='k'"):
        ev.TrainingLoop(step, num_steps=1, run_key="other", ctx=ctx)
    with pytest.raises(ValueError, match=r"config= and ctx\.run_config hold different"):
        ev.TrainingLoop(step, num_steps=1, config={"lr": 0.2}, ctx=ctx)
    with pytest.raises(TypeError, match="config must be a mapping"):
        ev.TrainingLoop(step, num_steps=1, config=[("lr", 0.2)])  # type: ignore[arg-type]
    loop = ev.TrainingLoop(step, num_steps=1, ctx=ctx)  # the ctx's output_dir and key
    assert loop.run_sync().run_dir == tmp_path / "a" / "k"


@pytest.mark.parametrize(
    ("where", "given", "words"),
    [
        ("callbacks", ev.Callback, "callbacks[0] is the class Callback, not an instance"),
        ("callbacks", "csv_metrics", "ev.build_callbacks"),
        ("callbacks", {"kind": "csv_metrics"}, "a config spec"),
        ("evaluators", Acc, "evaluators[0] is the class Acc, not an instance"),
    ],
)
def test_a_class_or_a_spec_where_an_instance_belongs_is_refused(
    where: str, given: Any, words: str, tmp_path: Path
) -> None:
    with pytest.raises(TypeError, match=re.escape(words)):
        ev.TrainingLoop(loss_step, num_steps=2, output_dir=tmp_path, **{where: [given]})
