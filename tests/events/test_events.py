"""Events: the vocabulary, its codec (JSON lines and msgpack) and its errors.

Every event type, built-in or user-defined, round-trips through both formats,
bare and inside an envelope; malformed input raises ``EventDecodeError``
naming the place; a tag clash and an unknown tag say what to do.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
import types
import typing
from typing import Any, ClassVar

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evsys_async as ev
from evsys_async import events
from evsys_async.errors import EventDecodeError, EvsysError
from evsys_async.events import Envelope, Event, _base, _codec

# -- user events (module level: a class defined twice would clash on its tag) --------


class EvTestLossSpike(Event):
    step: int
    loss: float


class EvTestTagged(Event, tag="evtest.tagged"):
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    note: str | None = None


class EvTestEvalPlus(events.EvalEnded):
    """A user subclass of a built-in: decodes as itself, not as its parent."""

    extra: list[int] = msgspec.field(default_factory=list)


class EvTestLevel(Event):
    value: float
    coalesce: ClassVar[bool] = True


BUILTIN = {
    # loop scope
    "TrainStarted": events.TrainStarted,
    "StepEnded": events.StepEnded,
    "EvalEnded": events.EvalEnded,
    "EvalFailed": events.EvalFailed,
    "CheckpointSaved": events.CheckpointSaved,
    "StopRequested": events.StopRequested,
    "TrainEnded": events.TrainEnded,
    # experiment scope
    "ExperimentStarted": events.ExperimentStarted,
    "GroupStarted": events.GroupStarted,
    "RunStarted": events.RunStarted,
    "BenchmarkEvaluated": events.BenchmarkEvaluated,
    "RunEnded": events.RunEnded,
    "ExperimentEnded": events.ExperimentEnded,
    # health
    "CallbackFailed": events.CallbackFailed,
    "SubscriberLagged": events.SubscriberLagged,
}
USER = [EvTestLossSpike, EvTestTagged, EvTestEvalPlus, EvTestLevel]
ALL_TYPES = [*BUILTIN.values(), *USER]

#: the documented fields (at least these; ts, run_key and rank on every event)
DOCUMENTED_FIELDS = {
    "TrainStarted": {"run_key", "num_steps", "start_step", "output_dir", "world_size"},
    "StepEnded": {"step", "num_steps", "metrics"},
    "EvalEnded": {"step", "eval_name", "metrics"},
    "EvalFailed": {"step", "eval_name", "error"},
    "CheckpointSaved": {"step", "name", "path", "row"},
    "StopRequested": {"step", "reason", "source"},
    "TrainEnded": {
        "status",
        "steps_completed",
        "num_steps",
        "stop_reason",
        "train_seconds",
        "error",
        "stop_rank",
    },
    "ExperimentStarted": {"name"},
    "GroupStarted": {"group_name"},
    "RunStarted": {"run_key", "arm", "repeat"},
    "BenchmarkEvaluated": {"step", "eval_result", "predictions"},
    "RunEnded": {"run_key", "arm", "result"},
    "ExperimentEnded": {"result"},
    "CallbackFailed": {"subscriber", "hook", "event_type", "error"},
    "SubscriberLagged": {"subscriber", "pending", "dropped"},
}

# -- strategies: field values from the declared types --------------------------------

_ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_text = st.text(max_size=12)
_json_values = st.recursive(
    st.none() | st.booleans() | _ints | _floats | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


def _strategy(tp: Any) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _json_values
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return _ints
    if tp is float:
        return _floats
    if tp is str:
        return _text
    if origin is dict:
        return st.dictionaries(_text, _strategy(args[1]), max_size=4)
    if origin is list:
        return st.lists(_strategy(args[0]), max_size=4)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(_strategy(a) for a in args))
    raise AssertionError(f"no strategy for field type {tp!r}: extend _strategy")


def _event_strategy(cls: type[Event]) -> st.SearchStrategy[Event]:
    fields = {f.name: _strategy(f.type) for f in msgspec.structs.fields(cls)}
    return st.builds(cls, **fields)


any_event = st.one_of(*(_event_strategy(cls) for cls in ALL_TYPES))
formats = st.sampled_from(["json", "msgpack"])


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Classes defined in the test register into a throwaway copy of the registry."""
    monkeypatch.setattr(_base, "_SUBCLASSES", list(_base._SUBCLASSES))
    monkeypatch.setattr(_codec, "_codec_cache", None)


# -- the vocabulary -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_event_is_frozen_kw_only_tagged_with_design_fields(name: str) -> None:
    cls = BUILTIN[name]
    assert getattr(ev.events, name) is cls
    config = cls.__struct_config__
    assert config.frozen and config.tag == name
    names = set(cls.__struct_fields__)
    assert DOCUMENTED_FIELDS[name] | {"ts", "run_key", "rank"} <= names
    assert events.event_types()[name] is cls


def test_builtin_events_are_keyword_only() -> None:
    # events are kw_only. msgspec applies kw_only=True only to the fields of
    # the class that says so (Event's ts and run_key), not to a subclass's own, so
    # StepEnded(0, 1) is accepted today.
    positional = {
        name: [
            p.name
            for p in inspect.signature(cls).parameters.values()
            if p.kind is not inspect.Parameter.KEYWORD_ONLY
        ]
        for name, cls in BUILTIN.items()
    }
    assert {name: ps for name, ps in positional.items() if ps} == {}


def test_every_event_has_wall_clock_ts_and_run_key_default() -> None:
    before = time.time()
    e = events.StepEnded(step=0, num_steps=1)
    after = time.time()
    assert before <= e.ts <= after
    assert e.run_key == ""
    with pytest.raises(AttributeError):
        e.step = 3  # type: ignore[misc]


def test_coalesce_flags() -> None:
    assert events.StepEnded.coalesce and events.SubscriberLagged.coalesce
    assert EvTestLevel.coalesce
    assert not events.EvalEnded.coalesce and not events.CallbackFailed.coalesce
    assert "coalesce" not in events.StepEnded.__struct_fields__  # a ClassVar, not encoded


def test_user_subclasses_are_registered() -> None:
    types_ = events.event_types()
    assert types_["EvTestLossSpike"] is EvTestLossSpike
    assert types_["evtest.tagged"] is EvTestTagged
    assert types_["EvTestEvalPlus"] is EvTestEvalPlus


@pytest.mark.usefixtures("isolated_registry")
def test_a_subclass_defined_later_in_another_module_registers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A user's module, with string annotations, defines an event after the codec was
    built: it registers, round-trips, and freezes what it holds."""
    events.event_types()  # the codec exists before the class does
    module = types.ModuleType("evtest_late_events")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    source = (
        "from __future__ import annotations\n"
        "from typing import Any\n"
        "import msgspec\n"
        "from evsys_async.events import Event\n"
        "class LateSpike(Event, kw_only=True):\n"
        "    step: int\n"
        "    values: dict[str, Any] = msgspec.field(default_factory=dict)\n"
    )
    exec(source, module.__dict__)
    late = module.LateSpike
    assert late.__module__ == "evtest_late_events"
    assert events.event_types()["LateSpike"] is late
    e = late(step=3, values={"x": [1, 2]})
    for fmt in ("json", "msgpack"):
        back = events.decode(events.encode(e, format=fmt), format=fmt)
        assert type(back) is late and back == e
        with pytest.raises(TypeError):
            back.values["x"].append(3)


def test_public_classes_name_their_public_module() -> None:
    """Reprs and pickles say ``evsys_async.events``, never the private module that
    defines a class, so they do not change when the package's insides move."""
    import pickle

    classes = [getattr(events, n) for n in events.__all__ if isinstance(getattr(events, n), type)]
    assert len(classes) == 18
    assert {c.__module__ for c in classes} == {"evsys_async.events"}
    assert repr(events.StepEnded) == "<class 'evsys_async.events.StepEnded'>"
    envelope = Envelope(bus_id="b", seq=1, event=events.StepEnded(step=0, num_steps=1))
    data = pickle.dumps(envelope)
    assert b"evsys_async.events\x94" in data and b"_vocabulary" not in data
    assert pickle.loads(data) == envelope


# -- round trips ----------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(event=any_event, fmt=formats)
def test_round_trip_every_event_type(event: Event, fmt: str) -> None:
    data = events.encode(event, format=fmt)
    back = events.decode(data, format=fmt)
    assert type(back) is type(event)
    assert back == event
    if fmt == "json":
        assert b"\n" not in data  # one JSON line
        assert events.decode(data.decode(), format="json") == event  # str accepted too


@settings(max_examples=100, deadline=None)
@given(
    event=any_event,
    fmt=formats,
    bus_id=_text,
    seq=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_round_trip_envelope(event: Event, fmt: str, bus_id: str, seq: int) -> None:
    env = Envelope(bus_id=bus_id, seq=seq, event=event)
    back = events.decode_envelope(events.encode(env, format=fmt), format=fmt)
    assert back == env
    assert type(back.event) is type(event)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_each_type_explicitly(cls: type[Event], fmt: str, data: st.DataObject) -> None:
    # the one_of above may favour some types; this covers each one by name
    event = data.draw(_event_strategy(cls))
    assert events.decode(events.encode(event, format=fmt), format=fmt) == event


def test_json_is_tagged_by_class_name_or_explicit_tag() -> None:
    assert b'"type":"StepEnded"' in events.encode(events.StepEnded(step=1, num_steps=2))
    assert b'"type":"evtest.tagged"' in events.encode(EvTestTagged())


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_non_finite_metrics_round_trip(fmt: str) -> None:
    # A diverging run logs loss=nan / grad_norm=inf; its event log must read back.
    # msgspec's JSON writes nan/inf as null, which then fails to decode as float.
    e = events.StepEnded(step=3, num_steps=10, metrics={"loss": math.nan, "gn": math.inf})
    back = events.decode(events.encode(e, format=fmt), format=fmt)
    assert isinstance(back, events.StepEnded)
    assert math.isnan(back.metrics["loss"])
    assert back.metrics["gn"] == math.inf


def test_encode_rejects_unknown_format() -> None:
    e = events.StepEnded(step=1, num_steps=2)
    with pytest.raises(ValueError, match="'json' or 'msgpack'"):
        events.encode(e, format="yaml")
    with pytest.raises(ValueError, match="'json' or 'msgpack'"):
        events.decode(b"{}", format="yaml")


# -- malformed input ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"{not json", ["malformed event", "JSON"]),
        (b'{"type":"StepEnded","step":"one","num_steps":2}', ["`$.step`", "int"]),
        (b'{"type":"StepEnded","step":1}', ["num_steps"]),
        (b'{"type":"StepEnd","step":1,"num_steps":2}', ["`$.type`", "StepEnd"]),
        (b'{"step":1,"num_steps":2}', ["type"]),
        (b'{"type":"StepEnded","step":1,"num_steps":2,"metrics":{"l":"x"}}', ["$.metrics"]),
        (b"[]", ["malformed event"]),
    ],
)
def test_malformed_event_names_the_place(data: bytes, words: list[str]) -> None:
    with pytest.raises(EventDecodeError) as info:
        events.decode(data)
    for word in words:
        assert word in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EvsysError)


def test_malformed_msgpack() -> None:
    with pytest.raises(EventDecodeError, match="malformed event"):
        events.decode(b"\xc1\xff", format="msgpack")
    bad = msgspec.msgpack.encode({"type": "StepEnded", "step": "x", "num_steps": 1})
    with pytest.raises(EventDecodeError, match=r"\$\.step"):
        events.decode(bad, format="msgpack")


@pytest.mark.parametrize(
    ("data", "place"),
    [
        (b'{"bus_id":"b","seq":"1","event":{"type":"StepEnded","step":1,"num_steps":2}}', "$.seq"),
        (
            b'{"bus_id":"b","seq":1,"event":{"type":"StepEnded","step":"x","num_steps":2}}',
            "$.event.step",
        ),
        (b'{"bus_id":"b","seq":1,"event":{"type":"Nope"}}', "$.event.type"),
        (b'{"bus_id":"b","event":{"type":"StepEnded","step":1,"num_steps":2}}', "seq"),
    ],
)
def test_malformed_envelope_names_the_place(data: bytes, place: str) -> None:
    with pytest.raises(EventDecodeError, match="malformed envelope") as info:
        events.decode_envelope(data)
    assert place in str(info.value)


def test_malformed_envelope_event_missing_field_names_the_event() -> None:
    # msgspec reports a missing field at the root of what it decodes without a path;
    # decoded in two steps, the message must still say it is inside `$.event`.
    data = b'{"bus_id":"b","seq":1,"event":{"type":"StepEnded","num_steps":2}}'
    with pytest.raises(EventDecodeError) as info:
        events.decode_envelope(data)
    assert "step" in str(info.value)
    assert "$.event" in str(info.value)


# -- tags -----------------------------------------------------------------------------


def test_event_type_lookup_and_suggestion() -> None:
    assert events.event_type("StepEnded") is events.StepEnded
    assert events.event_type("evtest.tagged") is EvTestTagged
    with pytest.raises(EventDecodeError, match="did you mean 'StepEnded'"):
        events.event_type("StepEnd")
    with pytest.raises(EventDecodeError) as info:
        events.event_type("zzzzzz")
    assert "'zzzzzz'" in str(info.value) and "did you mean" not in str(info.value)


@pytest.mark.usefixtures("isolated_registry")
def test_tag_clash_names_both_classes_and_the_fix() -> None:
    class StepEnded(Event):  # same tag as the built-in
        x: int = 0

    with pytest.raises(EventDecodeError) as info:
        events.event_types()
    msg = str(info.value)
    assert "evsys_async.events.StepEnded" in msg
    assert "test_tag_clash_names_both_classes_and_the_fix.<locals>.StepEnded" in msg
    assert "'StepEnded'" in msg and 'tag="..."' in msg
    with pytest.raises(EventDecodeError):
        events.decode(events.encode(events.EvalEnded(step=1, eval_name="v")))


@pytest.mark.usefixtures("isolated_registry")
def test_explicit_tag_resolves_a_clash() -> None:
    class StepEnded(Event, tag="mine.StepEnded"):
        x: int = 0

    assert events.event_types()["mine.StepEnded"] is StepEnded
    back = events.decode(events.encode(StepEnded(x=4)))
    assert type(back) is StepEnded and back.x == 4


@pytest.mark.usefixtures("isolated_registry")
def test_redefining_the_same_class_does_not_break_the_codec() -> None:
    # Re-running a notebook cell or reloading a module defines the same class
    # (same module and qualname) again: the newer definition should replace the
    # older one, as the callback registry does, not poison
    # every later decode with a tag clash.
    def define() -> type[Event]:
        class Redefined(Event):
            n: int = 0

        return Redefined

    define()
    newer = define()
    back = events.decode(events.encode(newer(n=2)))
    assert type(back) is newer
    assert events.decode(events.encode(events.StepEnded(step=1, num_steps=1))).step == 1


# -- read-only all the way down ----------------------------------------------------------


def test_mappings_inside_events_are_read_only_dicts() -> None:
    import copy
    import json
    import pickle

    from evsys_async.events import CheckpointSaved, StepEnded

    metrics = {"loss": 1.0}
    e = StepEnded(step=0, num_steps=1, metrics=metrics)
    with pytest.raises(TypeError, match="read-only"):
        e.metrics["loss"] = -1.0  # type: ignore[index]
    for mutate in (
        lambda m: m.update(x=1.0),
        lambda m: m.pop("loss"),
        lambda m: m.clear(),
        lambda m: m.setdefault("x", 1.0),
        lambda m: m.__delitem__("loss"),
    ):
        with pytest.raises(TypeError):
            mutate(e.metrics)
    assert e.metrics == {"loss": 1.0} and isinstance(e.metrics, dict)
    metrics["loss"] = 2.0  # the caller's dict is not the event's
    assert e.metrics["loss"] == 1.0
    mine = dict(e.metrics)
    mine["loss"] = 3.0  # a private copy is a plain dict
    assert json.loads(json.dumps(e.metrics)) == {"loss": 1.0}
    assert pickle.loads(pickle.dumps(e)) == e and copy.deepcopy(e) == e

    row = CheckpointSaved(step=0, name="a", row={"files": ["a", {"b": 1}]}).row
    with pytest.raises(TypeError):
        row["files"].append("c")
    with pytest.raises(TypeError):
        row["files"][1]["b"] = 2
    decoded = ev.events.decode(ev.events.encode(e))
    with pytest.raises(TypeError):
        decoded.metrics["loss"] = 0.0  # type: ignore[attr-defined]
    assert decoded == e


def test_user_events_freeze_their_own_containers_however_they_are_defined() -> None:
    class Plain(ev.Event, kw_only=True):
        rows: list[dict[str, Any]]

    class OwnPostInit(ev.Event, kw_only=True):
        table: dict[str, Any]
        seen: ClassVar[list[str]] = []

        def __post_init__(self) -> None:
            self.seen.append("mine")
            super().__post_init__()  # the general freeze for what this class holds

    plain = Plain(rows=[{"a": 1}])
    with pytest.raises(TypeError):
        plain.rows[0]["a"] = 2
    own = OwnPostInit(table={"k": [1]})
    assert OwnPostInit.seen == ["mine"]
    with pytest.raises(TypeError):
        own.table["k"].append(2)
    assert ev.events.decode(ev.events.encode(own)) == own
