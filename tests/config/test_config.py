"""Configs: round trips in YAML, TOML and JSON; every error names file, line and path."""

from __future__ import annotations

import json
import math
import re
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evsys_async as ev
from evsys_async.callbacks import CallbackSpec
from evsys_async.config import (
    ExperimentConfig,
    RunConfig,
    build_experiment,
    build_loop,
    encode_config,
    load_config,
)
from evsys_async.demo import demo_config

DOCS = Path(__file__).resolve().parents[2] / "docs"


# -- a tiny TOML writer for the round trips (tomli-w is not a dependency) -----------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(
            f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items() if v is not None
        )
        return "{" + items + "}"
    raise TypeError(value)


def to_toml(data: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in data.items() if v is not None)


def write(config: Any, fmt: str, directory: Path) -> Path:
    path = directory / f"config.{fmt}"
    if fmt == "toml":
        path.write_text(to_toml(msgspec.to_builtins(config)), encoding="utf-8")
    else:
        path.write_text(encode_config(config, fmt), encoding="utf-8")  # type: ignore[arg-type]
    return path


def test_strings_that_read_as_floats_round_trip_through_yaml(tmp_path: Path) -> None:
    """The loader reads ``1e308`` as a number, so the dumper quotes such strings."""
    config = RunConfig(
        num_steps=1, callbacks=[CallbackSpec(kind="x", params={"a": "0E0", "b": "1e-5"})]
    )
    loaded = load_config(write(config, "yaml", tmp_path), check=False)
    assert loaded == config


# -- strategies ----------------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12)
keys = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    text,
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))
params = st.dictionaries(keys, values, max_size=4)
specs = st.lists(st.fixed_dictionaries({"kind": keys, "params": params}), max_size=3)
positive = st.floats(min_value=1e-3, max_value=1e6, allow_nan=False)

run_configs = st.builds(
    lambda d: msgspec.convert(d, RunConfig),
    st.fixed_dictionaries(
        {
            "name": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True),
            "output_dir": text.filter(bool),
            "num_steps": st.integers(1, 10**6),
            "step": st.sampled_from(["demo", "pkg.mod:fn", "a.b.c:obj.attr"]),
            "params": params,
            "seed": st.integers(-(2**31), 2**31),
            "evaluators": specs,
            "callbacks": specs,
            "eval_mode": st.sampled_from(["inline", "background"]),
            "eval_timeout": positive,
            "save_every": st.integers(0, 1000),
            "checkpoint": st.none() | st.just("pkg.mod:save"),
            "control_timeout": positive,
            "drain_timeout": positive,
            "callback_errors": st.sampled_from(["log", "raise"]),
        }
    ),
)

experiment_configs = st.builds(
    lambda d: msgspec.convert(d, ExperimentConfig),
    st.fixed_dictionaries(
        {
            "name": st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True),
            "run": run_configs.map(msgspec.to_builtins),
            "arms": st.dictionaries(
                st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True),
                st.fixed_dictionaries({}, optional={"params": params, "step": st.just("demo")}),
                min_size=1,
                max_size=3,
            ),
            "repeats": st.integers(1, 5),
            "success_metric": st.none() | keys,
            "mode": st.sampled_from(["max", "min"]),
            "callbacks": specs,
        }
    ),
)


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=run_configs)
def test_run_config_round_trips(fmt: str, config: RunConfig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_config(write(config, fmt, Path(tmp)), check=False)
    assert loaded == config


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=experiment_configs)
def test_experiment_config_round_trips(fmt: str, config: ExperimentConfig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_config(write(config, fmt, Path(tmp)), check=False)
    assert isinstance(loaded, ExperimentConfig)
    assert loaded == config


@pytest.mark.parametrize("fmt", ["yaml", "toml", "json"])
def test_the_demo_round_trips_and_checks(fmt: str, tmp_path: Path) -> None:
    config = demo_config()
    assert load_config(write(config, fmt, tmp_path)) == config


# -- errors: file, line, path, the bad name, the suggestion -----------------------------------

YAML_TYPO = """\
name: typo
num_steps: 10
callbacks:
  - kind: print_progress
    params: {every: 5}
  - kind: early_stopping
    params:
      metric: pass_rate
      patiense: 3
"""


def load_text(tmp_path: Path, body: str, suffix: str = "yaml") -> Any:
    path = tmp_path / f"run.{suffix}"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return load_config(path)


def error_of(tmp_path: Path, body: str, suffix: str = "yaml") -> str:
    with pytest.raises(ev.ConfigError) as info:
        load_text(tmp_path, body, suffix)
    return str(info.value)


def test_callback_param_typo_names_file_line_path_and_fix(tmp_path: Path) -> None:
    msg = error_of(tmp_path, YAML_TYPO)
    assert msg.startswith(f"{tmp_path / 'run.yaml'}:9: ")
    assert "callbacks[1].params.patiense (early_stopping)" in msg
    assert "unknown field 'patiense'" in msg and "did you mean 'patience'?" in msg


def test_unknown_callback_kind(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "num_steps: 3\ncallbacks:\n  - kind: csv_metric\n")
    assert re.match(r".*run\.yaml:3: callbacks\[0\]\.kind: no callback kind 'csv_metric'", msg)
    assert "did you mean 'csv_metrics'?" in msg and "Known kinds:" in msg


def test_unknown_evaluator_kind_and_param(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "num_steps: 3\nevaluators:\n  - kind: demo_acuracy\n")
    assert "run.yaml:3: evaluators[0].kind" in msg and "did you mean 'demo_accuracy'?" in msg
    msg = error_of(
        tmp_path,
        "num_steps: 3\nevaluators:\n  - kind: demo_accuracy\n    params:\n      run_evry: 2\n",
    )
    assert "run.yaml:5: evaluators[0].params.run_evry (demo_accuracy)" in msg
    assert "did you mean 'run_every'?" in msg


def test_top_level_typo_and_missing_field(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: x\nnum_step: 3\n")
    assert "run.yaml:2: num_step: unknown field 'num_step' — did you mean 'num_steps'?" in msg
    msg = error_of(tmp_path, "name: x\n")
    assert "run.yaml:1:" in msg and "missing required field 'num_steps'" in msg


def test_wrong_types_show_expected_and_seen(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "name: x\nnum_steps: ten\n")
    assert "run.yaml:2: num_steps: expected int, got str 'ten'" in msg
    msg = error_of(tmp_path, "num_steps: 0\n")
    assert "run.yaml:1: num_steps: expected `int` >= 1, got int 0" in msg
    msg = error_of(tmp_path, "num_steps: 3\neval_mode: async\n")
    assert "run.yaml:2: eval_mode: expected one of 'background', 'inline', got str 'async'" in msg
    msg = error_of(tmp_path, "num_steps: 3\nname: ../escape\n")
    assert "run.yaml:2: name:" in msg and "'../escape'" in msg


def test_malformed_files_give_the_line(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "num_steps: 3\ncallbacks: [\n  {kind: x\nname: y\n")
    assert re.search(r"run\.yaml:\d+: malformed YAML", msg)
    assert "run.json:3: malformed JSON" in error_of(
        tmp_path, '{\n"num_steps": 3\n"name": "x"}', "json"
    )
    assert "run.toml:2: malformed TOML" in error_of(tmp_path, "num_steps = 3\nname = \n", "toml")
    msg = error_of(tmp_path, "num_steps: 3\nseed: 1\nseed: 2\n")
    assert "run.yaml:3: duplicate key 'seed' (first on line 2)" in msg
    assert "a config is a mapping" in error_of(tmp_path, "- 1\n- 2\n")
    assert "unknown config format '.ini'" in error_of(tmp_path, "x", "ini")


def test_toml_and_json_errors_name_file_and_path(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path,
        'num_steps = 3\n[[callbacks]]\nkind = "early_stopping"\nparams = {metric = "a", patiense = 3}\n',
        "toml",
    )
    assert msg.startswith(str(tmp_path / "run.toml") + ": callbacks[0].params.patiense")
    assert "did you mean 'patience'?" in msg
    msg = error_of(tmp_path, '{"num_steps": 3, "seed": "one"}', "json")
    assert "run.json: seed: expected int, got str 'one'" in msg


def test_yaml_is_loaded_safely(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    msg = error_of(tmp_path, f"num_steps: !!python/object/apply:os.system ['touch {marker}']\n")
    assert "malformed YAML" in msg and "python/object/apply" in msg
    assert not marker.exists()


# -- dotted paths: only through the keys that hold one ------------------------------------------


def test_bad_step_paths_name_the_key_and_what_failed(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "num_steps: 3\nstep: no_such_pkg.train:step\n")
    assert "run.yaml:2: step: could not import module 'no_such_pkg.train'" in msg
    assert "no module named 'no_such_pkg'" in msg
    (tmp_path / "mysteps.py").write_text("def train_step(state, i):\n    return {}\n")
    msg = error_of(tmp_path, "num_steps: 3\nstep: mysteps:train_stpe\n")
    assert (
        "step: could not import 'mysteps:train_stpe': 'mysteps' has no attribute 'train_stpe'"
        in msg
    )
    assert "did you mean 'train_step'?" in msg
    msg = error_of(tmp_path, "num_steps: 3\nstep: mysteps.train_step\n")
    assert (
        'expected "package.module:function"' in msg and 'did you mean "mysteps:train_step"' in msg
    )
    (tmp_path / "broken_steps.py").write_text("raise RuntimeError('bad import')\n")
    msg = error_of(tmp_path, "num_steps: 3\nstep: broken_steps:x\n")
    assert "importing module 'broken_steps'" in msg and "RuntimeError: bad import" in msg
    msg = error_of(tmp_path, "num_steps: 3\ncheckpoint: mysteps:nothing\n")
    assert "run.yaml:2: checkpoint:" in msg


STEP_MODULE = """\
def train_step(state, step_idx):
    cfg = state.ctx.run_config
    return {"loss": cfg["scale"] / (step_idx + 1), "seed": cfg["seed"]}
"""


@pytest.mark.anyio
async def test_build_loop_runs_a_step_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "beside_steps.py").write_text(STEP_MODULE)
    out = tmp_path / "out"
    config = load_text(
        tmp_path,
        f"""\
        name: beside
        output_dir: {out}
        num_steps: 4
        step: beside_steps:train_step
        seed: 7
        params: {{scale: 2.0}}
        callbacks:
          - kind: csv_metrics
            params: {{out_path: metrics.csv}}
        """,
    )
    loop = build_loop(config)
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "completed" and artifacts.run_dir == out / "beside"
    rows = (out / "beside" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,seed" and len(rows) == 5
    assert rows[1] == "0,2.0,7.0"


def test_docs_yaml_is_the_demo(tmp_path: Path) -> None:
    """docs/config.md holds the demo as YAML; it must stay equal to demo_config()."""
    page = (DOCS / "config.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- demo-yaml -->\s*```yaml\n(.*?)```", page, re.S)
    assert block is not None
    path = tmp_path / "demo.yaml"
    path.write_text(block.group(1), encoding="utf-8")
    assert load_config(path) == demo_config()


# -- experiments --------------------------------------------------------------------------------

EXPERIMENT = """\
name: lr-sweep
repeats: 2
success_metric: pass_rate
run:
  output_dir: {out}
  num_steps: 8
  params: {{delay: 0.0, n_train: 200, n_test: 100}}
  evaluators:
    - kind: demo_accuracy
      params: {{run_every: 4}}
arms:
  slow: {{params: {{lr: 0.01}}}}
  fast: {{params: {{lr: 0.5}}}}
"""


def test_experiment_errors_point_at_the_arm(tmp_path: Path) -> None:
    body = EXPERIMENT.format(out=tmp_path) + "  odd: {lr: 0.1}\n"
    msg = error_of(tmp_path, body)
    assert "run.yaml:14: arms.odd.lr: cannot override 'lr'" in msg
    body = EXPERIMENT.format(out=tmp_path) + "  odd: {step: nowhere:fn}\n"
    assert "run.yaml:14: arms.odd.step: could not import module 'nowhere'" in error_of(
        tmp_path, body
    )


@pytest.mark.anyio
async def test_build_experiment_runs_every_arm(tmp_path: Path) -> None:
    config = load_text(tmp_path, EXPERIMENT.format(out=tmp_path / "runs"))
    assert isinstance(config, ExperimentConfig)
    experiment = build_experiment(config)
    with anyio.fail_after(60):
        result = await experiment.run()
    assert set(result.arms) == {"slow", "fast"}
    for arm in result.arms.values():
        assert [r.status for r in arm.runs] == ["completed", "completed"]
        assert 0.0 <= arm.mean["val/pass_rate"] <= 1.0
    assert result.best_arm in {"slow", "fast"}
    assert (tmp_path / "runs" / "lr-sweep" / "fast-r1" / "manifest.json").exists()
    assert math.isfinite(result.arms["fast"].mean["val/loss"])


def test_a_coordinator_section_is_checked_with_placed_errors_and_built(tmp_path: Path) -> None:
    from evsys_async.transports import RedisCoordinator

    path = tmp_path / "run.yaml"
    path.write_text(
        "name: ranks\nnum_steps: 3\n"
        "coordinator: {kind: redis, params: {url: 'redis://:hunter2@127.0.0.1:6379/0',"
        " timeout: 3}}\n"
    )
    config = ev.load_config(path)
    loop = ev.build_loop(config)
    assert isinstance(loop.coordinator, RedisCoordinator)
    assert loop.coordinator.run_key == "ranks"  # the run's name by default
    assert "hunter2" not in json.dumps(loop.ctx.config)  # recorded redacted
    path.write_text("name: r\nnum_steps: 3\ncoordinator: {kind: redis, params: {timout: 3}}\n")
    with pytest.raises(ev.ConfigError, match=r"run.yaml:3: coordinator.params.timout .*'timeout'"):
        ev.load_config(path)
    path.write_text("name: r\nnum_steps: 3\ncoordinator: {kind: mpi}\n")
    with pytest.raises(ev.ConfigError, match="unknown coordinator kind 'mpi'"):
        ev.load_config(path)


def test_strict_in_a_config_reaches_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("num_steps: 3\nstrict: true\n", encoding="utf-8")
    config = load_config(path)
    assert isinstance(config, RunConfig)
    assert config.strict is True
    assert build_loop(config).strict is True


# -- a callback's or an evaluator's class by its import path --------------------------------

KINDS_MODULE = """\
import msgspec
import evsys_async as ev


class Counter(ev.Callback):
    class Config(msgspec.Struct, forbid_unknown_fields=True):
        out: str = "count.txt"

    def __init__(self, out: str = "count.txt") -> None:
        self.out = out
        self.n = 0

    def on_step_end(self, state, step_idx, batch, metrics):
        self.n += 1

    def teardown(self, state):
        (state.run_dir / self.out).write_text(str(self.n))


class Const:
    def __init__(self, name: str = "const", run_every: int = 2) -> None:
        self.name, self.run_every = name, run_every

    async def evaluate(self, state, step_idx):
        return {"c": 1.0}


NOT_A_CLASS = 3
"""


@pytest.mark.anyio
async def test_kinds_by_import_path_build_and_run(tmp_path: Path) -> None:
    """``kind: "module:Class"`` (and ``module.Class``) for callbacks and evaluators: checked
    like a registered kind (params included), built, run."""
    (tmp_path / "path_kinds.py").write_text(KINDS_MODULE)
    out = tmp_path / "out"
    config = load_text(
        tmp_path,
        f"""\
        name: kinds
        output_dir: {out}
        num_steps: 4
        evaluators:
          - {{kind: "path_kinds:Const", params: {{run_every: 2}}}}
        callbacks:
          - {{kind: "path_kinds:Counter", params: {{out: a.txt}}}}
          - {{kind: path_kinds.Counter}}
          - {{kind: csv_metrics, params: {{out_path: m.csv}}}}
        """,
    )
    loop = build_loop(config)
    with anyio.fail_after(30):
        artifacts = await loop.run()
    assert artifacts.status == "completed"
    assert (out / "kinds" / "a.txt").read_text() == "4"
    assert (out / "kinds" / "count.txt").read_text() == "4"
    rows = (out / "kinds" / "m.csv").read_text().splitlines()
    assert rows[0].split(",")[-1] == "val/const/c" and len(rows) == 1 + 4 + 2  # 2 eval rows
    msg = error_of(tmp_path, 'num_steps: 3\ncallbacks:\n  - {kind: "path_kinds:Counter",'
                   " params: {outt: x}}\n")  # fmt: skip
    assert "callbacks[0].params.outt (path_kinds:Counter): unknown field 'outt'" in msg
    assert "did you mean 'out'?" in msg


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (
            '"no_such_kinds_mod:Counter"',
            "callbacks[0].kind: could not import module 'no_such_kinds_mod' for "
            "'no_such_kinds_mod:Counter': no module named 'no_such_kinds_mod' (is it installed, "
            "or beside the config file?)",
        ),
        (
            '"path_kinds2:Countr"',
            "callbacks[0].kind: could not import 'path_kinds2:Countr': 'path_kinds2' has no "
            "attribute 'Countr' — did you mean 'Counter'?",
        ),
        ('"path_kinds2:NOT_A_CLASS"', "'path_kinds2:NOT_A_CLASS' names 3 (int), not a callback"),
        ('"path_kinds2:Const"', "a callback kind must be a Callback subclass"),
        ("path_kinds2.Countr", "no callback kind 'path_kinds2.Countr' (could not import"),
        ("csv.metrics", "did you mean 'csv_metrics'?"),
        ('":Counter"', "expected \"package.module:Class\", got ':Counter'"),
    ],
)
def test_a_kind_path_that_does_not_import_says_why_as_a_step_does(
    tmp_path: Path, kind: str, words: str
) -> None:
    (tmp_path / "path_kinds2.py").write_text(KINDS_MODULE)
    msg = error_of(tmp_path, f"num_steps: 3\ncallbacks:\n  - kind: {kind}\n")
    assert msg.startswith(f"{tmp_path / 'run.yaml'}:3: "), msg
    assert words in msg, msg


def test_a_callbacks_file_finds_a_kind_beside_it(tmp_path: Path) -> None:
    (tmp_path / "path_kinds3.py").write_text(KINDS_MODULE)
    path = tmp_path / "cbs.yaml"
    path.write_text('- {kind: "path_kinds3:Counter"}\n')
    (built,) = ev.config.load_callbacks(path)
    assert type(built).__name__ == "Counter"


def test_the_demo_steps_params_are_checked_and_a_steps_config_is_honoured(tmp_path: Path) -> None:
    """The demo's params (and any step function's ``Config``) are checked on load: a
    misspelt name or a wrong type names the place and the step's params."""
    msg = error_of(tmp_path, "num_steps: 3\nparams: {dealy: 0.01}\n")
    assert "run.yaml:2: params.dealy: unknown field 'dealy' — did you mean 'delay'?" in msg
    assert "(step 'demo' takes: lr, batch_size, n_features, n_train, n_test, noise, delay)" in msg
    msg = error_of(tmp_path, "num_steps: 3\nparams: {lr: fast}\n")
    assert "params.lr: expected float, got str 'fast'" in msg
    msg = error_of(tmp_path, "name: e\nrun: {num_steps: 3}\narms: {a: {params: {batch: 2}}}\n")
    assert "arms.a.params.batch: unknown field 'batch'" in msg
    assert isinstance(load_text(tmp_path, "num_steps: 3\nparams: {delay: 0, lr: 0.2}\n"), RunConfig)
    (tmp_path / "checked_steps.py").write_text(
        "import msgspec\n"
        "class P(msgspec.Struct, forbid_unknown_fields=True):\n"
        "    width: int = 2\n"
        "def step(state, i):\n"
        "    return {}\n"
        "step.Config = P\n"
        "def free(state, i):\n"
        "    return {}\n"
    )
    msg = error_of(tmp_path, "num_steps: 3\nstep: checked_steps:step\nparams: {widht: 3}\n")
    assert "params.widht: unknown field 'widht' — did you mean 'width'?" in msg
    assert "(step 'checked_steps:step' takes: width)" in msg
    free = "num_steps: 3\nstep: checked_steps:free\nparams: {anything: 1}\n"
    assert isinstance(load_text(tmp_path, free), RunConfig)
