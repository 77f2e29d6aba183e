"""The parent-child wire (``bus/_delivery/wire.py``) and the requests a callback's process
sends (``callbacks/_requests.py``): tagged msgspec Structs, decoded with their union on
the other end, an unknown one an error that names it. No process is started here."""

from __future__ import annotations

import inspect
import logging

import msgspec
import pytest

import evsys_async as ev
from evsys_async.bus._delivery import wire
from evsys_async.callbacks._requests import (
    Checkpoint,
    Eval,
    Health,
    Publish,
    Stop,
    apply,
    decode_request,
    encode_request,
)
from evsys_async.errors import CallbackProcessError, ChildTraceback
from evsys_async.events import StepEnded, StopRequested


def test_every_message_to_the_child_crosses_and_comes_back_as_itself() -> None:
    event = StepEnded(step=3, num_steps=10, metrics={"loss": 0.5})
    batch = wire.decode_from_parent(wire.encode(wire.Batch(True, False, [(7, event)])))
    assert isinstance(batch, wire.Batch) and batch.flush and not batch.quiet
    [(seq, raw)] = batch.items
    assert seq == 7 and ev.events.decode(raw, format="msgpack") == event
    for message in (wire.RunHook("on_close"), wire.Call(b"fn"), wire.End()):
        assert wire.decode_from_parent(wire.encode(message)) == message


def test_every_message_to_the_parent_crosses_and_comes_back_as_itself() -> None:
    failure = wire.Failure(None, "ValueError: x", "Traceback ...")
    for message in (
        wire.Ready(),
        wire.Broken("ImportError: y", "Traceback ..."),
        wire.Done(),
        wire.Returned(b"value"),
        wire.Raised(failure),
        wire.Failed(2, "", False, failure),
        wire.Failed(3, "", False, None, "ValueError"),  # a repeat: its type's name only
        wire.Disabled("3 failures in a row (the last: ValueError: x)", 4),
        wire.Request(b"opaque"),
        wire.Log("evsys_async.x", logging.WARNING, "hello", None),
        wire.Output(2, "a line\n"),
    ):
        assert wire.decode_from_child(wire.encode(message)) == message


def test_an_unknown_message_is_an_error_that_names_it() -> None:
    with pytest.raises(CallbackProcessError, match="'gossip'") as raised:
        wire.decode_from_child(msgspec.msgpack.encode(["gossip", 1]))
    assert "same evsys_async" in str(raised.value)
    with pytest.raises(CallbackProcessError, match="'done'"):  # a reply goes the other way
        wire.decode_from_parent(wire.encode(wire.Done()))
    with pytest.raises(CallbackProcessError, match="'hook'"):  # a slot it does not know
        wire.decode_from_parent(msgspec.msgpack.encode(["hook", "on_everything"]))


def test_a_failure_is_rebuilt_with_the_childs_traceback_as_its_cause() -> None:
    rebuilt = wire.rebuild(wire.failure_of(LookupError("gone")))
    assert isinstance(rebuilt, LookupError) and str(rebuilt) == "gone"
    assert isinstance(rebuilt.__cause__, ChildTraceback)

    class Local(Exception):  # cannot be pickled: rebuilt from its one line
        pass

    failure = wire.failure_of(Local("here"))
    assert failure.exception is None
    rebuilt = wire.rebuild(failure)
    assert isinstance(rebuilt, CallbackProcessError) and "Local: here" in str(rebuilt)


def test_each_request_applies_to_the_runs_state() -> None:
    published: list[object] = []
    state = ev.LoopState()
    state.bind(published.append)
    event = StopRequested(step=1, reason="custom")
    for request in (Checkpoint("best"), Eval(), Publish.of(event), Stop("plateau", True)):
        apply(state, decode_request(encode_request(request), callback="cb"))
    assert state.take_requests() == (["best"], True)
    assert published == [event]
    assert (state.stop_requested, state.stop_reason, state.stop_failed) == (True, "plateau", True)


def test_a_callbacks_health_crosses_as_itself_and_is_no_request_of_the_run() -> None:
    health = Health(ev.Degraded("disk full", rows_lost=3, missing_from_step=7), "no server")
    assert decode_request(encode_request(health), callback="cb") == health
    state = ev.LoopState()
    apply(state, health)  # the adapter keeps it; the run's state is not touched
    assert not state.has_requests and not state.stop_requested


def test_an_unknown_request_is_an_error_that_names_it() -> None:
    with pytest.raises(ValueError, match=r"callback 'cb'.*'rewind'.*stop, checkpoint"):
        decode_request(msgspec.msgpack.encode(["rewind", 3]), callback="cb")
    with pytest.raises(ValueError, match="'stop'"):  # a known tag of the wrong shape
        decode_request(msgspec.msgpack.encode(["stop"]), callback="cb")


def test_subscribe_takes_what_a_user_passes() -> None:
    """``on_interrupt`` is the package's own (``subscribe_with``); ``sync`` stays as the
    older spelling of ``isolation``."""
    params = inspect.signature(ev.EventBus.subscribe).parameters
    assert "on_interrupt" not in params
    assert {"isolation", "sync", "on_request", "hook_name"} <= set(params)
