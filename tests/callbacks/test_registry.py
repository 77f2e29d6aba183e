"""The callback registry: errors that name the place and the fix, and entry points for real."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

import evsys_async as ev
from evsys_async.callbacks.registry import CALLBACKS, PlacedConfigError


def test_unknown_param_names_place_and_close_name() -> None:
    specs = [
        {"kind": "print_progress"},
        {"kind": "early_stopping", "params": {"metric": "acc", "patiense": 3}},
    ]
    with pytest.raises(ev.ConfigError) as info:
        ev.build_callbacks(specs)
    msg = str(info.value)
    assert msg.startswith("callbacks[1].params.patiense (early_stopping):")
    assert "unknown field 'patiense'" in msg
    assert "did you mean 'patience'?" in msg
    assert isinstance(info.value, PlacedConfigError)
    assert info.value.path == ("callbacks", 1, "params", "patiense")


def test_unknown_kind_suggests_and_lists_known_kinds() -> None:
    with pytest.raises(ev.ConfigError) as info:
        ev.build_callbacks([{"kind": "csv_metric"}])
    msg = str(info.value)
    assert msg.startswith("callbacks[0].kind:")
    assert "no callback kind 'csv_metric'" in msg
    assert "did you mean 'csv_metrics'?" in msg
    assert "Known kinds:" in msg and "early_stopping" in msg


def test_unknown_kind_without_close_name_still_lists_kinds() -> None:
    with pytest.raises(
        ev.ConfigError, match=r"no callback kind 'zzz'\. Known kinds: .*print_progress"
    ):
        ev.get_callback("zzz")


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"metric": "acc", "patience": "three"}, ["params.patience", "expected int", "'three'"]),
        ({"metric": "acc", "mode": "up"}, ["params.mode", "one of 'max', 'min'", "'up'"]),
        ({}, ["callbacks[0].params", "missing required field 'metric'"]),
        ({"metric": "acc", "patience": 0}, ["callbacks[0].params", "patience must be >= 1"]),
    ],
)
def test_wrong_types_give_expected_type_and_value_seen(
    params: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ev.ConfigError) as info:
        ev.build_callbacks([{"kind": "early_stopping", "params": params}])
    for word in words:
        assert word in str(info.value)


def test_nested_type_error_points_inside_the_list() -> None:
    with pytest.raises(
        ev.ConfigError, match=r"callbacks\[0\]\.params\.keys\[1\] .*expected str, got int 3"
    ):
        ev.build_callbacks([{"kind": "print_progress", "params": {"keys": ["loss", 3]}}])


def test_bad_spec_shapes() -> None:
    with pytest.raises(
        ev.ConfigError,
        match=r"callbacks\[0\]\.parms: unknown key 'parms' — did you mean 'params'\?",
    ):
        ev.build_callbacks([{"kind": "print_progress", "parms": {}}])
    with pytest.raises(ev.ConfigError, match=r"callbacks\[0\]: missing 'kind'"):
        ev.build_callbacks([{"params": {}}])
    with pytest.raises(ev.ConfigError, match=r"callbacks: expected a list"):
        ev.build_callbacks({"kind": "print_progress"})  # type: ignore[arg-type]
    with pytest.raises(ev.ConfigError, match=r"callbacks\[0\]\.kind: expected a string, got int 3"):
        ev.build_callbacks([{"kind": 3}])


def test_spec_objects_and_callbackspec_build() -> None:
    built = ev.build_callbacks([ev.CallbackSpec(kind="print_progress", params={"every": 5})])
    assert built[0].every == 5  # type: ignore[attr-defined]


def test_every_spec_is_checked_before_any_is_built() -> None:
    made: list[str] = []

    @ev.register_callback("test_counting")
    class Counting(ev.Callback):
        class Config(msgspec.Struct, forbid_unknown_fields=True):
            x: int = 0

        def __init__(self, x: int = 0) -> None:
            made.append("built")

    with pytest.raises(ev.ConfigError):
        ev.build_callbacks([{"kind": "test_counting"}, {"kind": "nope"}])
    assert made == []


def test_class_without_config_is_checked_against_init() -> None:
    @ev.register_callback("test_plain_init")
    class Plain(ev.Callback):
        def __init__(self, every: int = 1) -> None:
            self.every = every

    assert ev.build_callbacks([{"kind": "test_plain_init", "params": {"every": 2}}])[0].every == 2  # type: ignore[attr-defined]
    with pytest.raises(ev.ConfigError, match=r"params\.evry .*did you mean 'every'"):
        ev.build_callbacks([{"kind": "test_plain_init", "params": {"evry": 2}}])


def test_register_same_class_again_is_fine_a_different_one_raises() -> None:
    def make() -> type[ev.Callback]:
        class Twice(ev.Callback):
            pass

        return Twice

    first = make()
    ev.register_callback("test_twice")(first)
    ev.register_callback("test_twice")(make())  # same qualified name: replaces

    class Other(ev.Callback):
        pass

    with pytest.raises(
        ev.ConfigError,
        match=r"already registered to .*Twice; pick another name or pass replace=True",
    ):
        ev.register_callback("test_twice")(Other)
    ev.register_callback("test_twice", replace=True)(Other)
    assert ev.get_callback("test_twice") is Other
    with pytest.raises(TypeError, match="decorates Callback subclasses"):
        ev.register_callback("test_not_a_callback")(int)  # type: ignore[type-var]


# -- entry points, for real: a dist-info on sys.path --------------------------------------


def write_plugin(root: Path, *, group: str = "evsys_async.callbacks", broken: bool = False) -> None:
    """A tiny installed distribution: a module and its dist-info with entry_points.txt."""
    (root / "evsys_plugin_demo.py").write_text(
        textwrap.dedent(
            """
            import msgspec
            import evsys_async as ev

            class PluginCallback(ev.Callback):
                '''A callback from a third-party package.'''

                class Config(msgspec.Struct, forbid_unknown_fields=True):
                    level: int = 1

                def __init__(self, level: int = 1) -> None:
                    self.level = level

            class PluginEvaluator:
                class Config(msgspec.Struct, forbid_unknown_fields=True):
                    run_every: int = 1

                def __init__(self, run_every: int = 1) -> None:
                    self.name, self.run_every = "plugin", run_every

                async def evaluate(self, state, step_idx):
                    return {"score": 1.0}
            """
        )
    )
    dist = root / "evsys_plugin_demo-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evsys-plugin-demo\nVersion: 0.1\n")
    target = "evsys_plugin_missing:Nope" if broken else "evsys_plugin_demo:PluginCallback"
    (dist / "entry_points.txt").write_text(
        f"[evsys_async.callbacks]\nplugin_cb = {target}\n"
        "[evsys_async.evaluators]\nplugin_eval = evsys_plugin_demo:PluginEvaluator\n"
    )


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    write_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    CALLBACKS.refresh()
    yield tmp_path
    CALLBACKS.refresh()


def test_entry_point_kind_is_found_validated_and_built(plugin_path: Path) -> None:
    assert "plugin_cb" in ev.list_callbacks()
    (cb,) = ev.build_callbacks([{"kind": "plugin_cb", "params": {"level": 3}}])
    assert type(cb).__name__ == "PluginCallback" and cb.level == 3  # type: ignore[attr-defined]
    with pytest.raises(ev.ConfigError, match=r"params\.levl \(plugin_cb\): .*did you mean 'level'"):
        ev.build_callbacks([{"kind": "plugin_cb", "params": {"levl": 3}}])
    with pytest.raises(ev.ConfigError, match="did you mean 'plugin_cb'"):
        ev.get_callback("plugin_bc")


def test_broken_entry_point_fails_only_when_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_plugin(tmp_path, broken=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    CALLBACKS.refresh()
    try:
        ev.build_callbacks([{"kind": "print_progress"}])  # other kinds still work
        with pytest.raises(ev.ConfigError) as info:
            ev.build_callbacks([{"kind": "plugin_cb"}])
        msg = str(info.value)
        assert "callbacks[0]" in msg and "entry point 'plugin_cb'" in msg
        assert "evsys_plugin_missing:Nope" in msg and "failed to import" in msg
        assert "plugin_cb" not in ev.list_callbacks()  # skipped with a warning
    finally:
        CALLBACKS.refresh()


@pytest.mark.slow
def test_entry_point_in_a_fresh_process(tmp_path: Path) -> None:
    """What a user sees: the plug-in installed, `evsys-async callbacks` lists it."""
    write_plugin(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "evsys_async", "callbacks"],
        capture_output=True,
        text=True,
        env={**_env(), "PYTHONPATH": str(tmp_path)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "plugin_cb  (evsys_plugin_demo.PluginCallback)" in proc.stdout
    assert "level: int = 1" in proc.stdout


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
