"""The ``transports:`` section of a run config: checked with placed errors, built into
sink callbacks, recorded without credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

import evsys_async as ev
from evsys_async.callbacks import SinkCallback
from evsys_async.config import RunConfig, build_loop, load_config
from evsys_async.transports import RedisStreamSink


def load(tmp_path: Path, body: str) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(body, encoding="utf-8")
    config = load_config(path)
    assert isinstance(config, RunConfig)
    return config


def error_of(tmp_path: Path, body: str) -> str:
    with pytest.raises(ev.ConfigError) as info:
        load(tmp_path, body)
    return str(info.value)


def test_an_unknown_transport_kind_is_placed_with_the_close_name(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "num_steps: 3\ntransports:\n  - kind: rediss\n")
    assert msg.startswith(f"{tmp_path / 'run.yaml'}:3: transports[0].kind: ")
    assert "unknown transport kind 'rediss'" in msg and "did you mean 'redis'?" in msg


def test_transport_params_are_checked_like_callback_params(tmp_path: Path) -> None:
    msg = error_of(
        tmp_path, "num_steps: 3\ntransports:\n  - kind: redis\n    params:\n      maxlne: 10\n"
    )
    assert "run.yaml:5: transports[0].params.maxlne (redis)" in msg
    assert "did you mean 'maxlen'?" in msg
    msg = error_of(
        tmp_path, "num_steps: 3\ntransports: [{kind: redis, params: {max_buffered: 0}}]\n"
    )
    assert "transports[0].params.max_buffered (redis): expected `int` >= 1, got int 0" in msg
    msg = error_of(
        tmp_path,
        "num_steps: 3\ntransports: [{kind: redis, params: {url: redis://h, url_env: R}}]\n",
    )
    assert "transports[0].params.url_env (redis): give url or url_env, not both" in msg


def test_url_env_keeps_the_password_out_of_the_file_and_the_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load(
        tmp_path,
        "num_steps: 3\ntransports:\n"
        "  - {kind: redis, params: {url_env: EVSYS_TEST_URL, maxlen: 50}}\n"
        "  - {kind: redis, params: {url: 'redis://:inline-pw@127.0.0.1:6379/0'}}\n",
    )
    monkeypatch.delenv("EVSYS_TEST_URL", raising=False)
    with pytest.raises(
        ev.ConfigError,
        match=r"transports\[0\]\.params\.url_env \(redis\): "
        "the environment variable EVSYS_TEST_URL is not set",
    ):
        build_loop(config)
    monkeypatch.setenv("EVSYS_TEST_URL", "redis://:env-pw@127.0.0.1:6379/0")
    loop = build_loop(config)
    sinks = [cb.sink for cb in loop.callbacks if isinstance(cb, SinkCallback)]
    assert [type(s) for s in sinks] == [RedisStreamSink, RedisStreamSink]
    assert sinks[0].url == "redis://:env-pw@127.0.0.1:6379/0" and sinks[0].maxlen == 50
    recorded = str(loop.ctx.config)
    assert "inline-pw" not in recorded and "env-pw" not in recorded
    assert "redis://:***@127.0.0.1:6379/0" in recorded
    assert config.transports[1].params["url"].endswith("inline-pw@127.0.0.1:6379/0")  # as given


def test_a_config_without_transports_has_no_sink(tmp_path: Path) -> None:
    loop = build_loop(load(tmp_path, "num_steps: 3\n"))
    assert not any(isinstance(cb, SinkCallback) for cb in loop.callbacks)


def test_sink_callback_refuses_what_is_not_a_sink() -> None:
    with pytest.raises(TypeError, match="has no flush"):
        SinkCallback(print)


def test_a_nonblocking_sink_is_fed_on_the_event_loop_and_named_after_it(tmp_path: Path) -> None:
    from evsys_async.callbacks._adapter import CallbackAdapter
    from evsys_async.transports import JsonlSink

    redis_cb = SinkCallback(RedisStreamSink("redis://127.0.0.1:6379/0", "x"))
    file_cb = SinkCallback(JsonlSink(tmp_path / "e.jsonl"))
    assert type(redis_cb).__name__ == "RedisStreamSink" and isinstance(redis_cb, SinkCallback)
    assert type(file_cb).__name__ == "JsonlSink"
    assert CallbackAdapter(redis_cb, ev.LoopState()).is_async  # no thread hop per event
    assert not CallbackAdapter(file_cb, ev.LoopState()).is_async  # file writes: its thread
