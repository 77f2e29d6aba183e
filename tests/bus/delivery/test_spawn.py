"""What ``bus/_delivery/spawn.py`` decides before a child starts: can a child import what
``__main__`` defines? A subscriber whose handler it cannot is refused at subscribe,
naming the fix. No process is started here: the real ``python -c`` case is in
``tests/callbacks/test_remote.py``."""

from __future__ import annotations

import sys
import types
from typing import Any

import anyio
import pytest

import evsys_async as ev
from evsys_async.bus._delivery.spawn import dumps_for_child, main_importable
from evsys_async.events import StepEnded


def interactive_main(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """``__main__`` as a notebook or ``python -c`` has it: no file, no spec."""
    main = types.ModuleType("__main__")
    main.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", main)
    return main


def defined_in_main(main: types.ModuleType) -> type:
    class Handler:
        def __call__(self, event: Any) -> None:
            pass

    Handler.__module__ = "__main__"
    Handler.__qualname__ = "Handler"
    main.Handler = Handler  # type: ignore[attr-defined]
    return Handler


def test_a_script_or_a_module_main_is_importable_an_interactive_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert main_importable()  # pytest's own __main__ runs from a file
    main = interactive_main(monkeypatch)
    assert not main_importable()
    main.__file__ = "/tmp/script.py"
    assert main_importable()  # a script: the child runs it again
    del main.__file__
    main.__spec__ = types.SimpleNamespace(name="pkg.tool")  # type: ignore[assignment]
    assert main_importable()  # python -m pkg.tool: the child imports it by name


def test_dumps_for_child_names_what_a_child_could_not_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    main = interactive_main(monkeypatch)
    handler = defined_in_main(main)()
    data, unreachable = dumps_for_child((handler, [handler], None))
    assert data and unreachable == ["Handler"]
    _, none = dumps_for_child((print, StepEnded))  # nothing of __main__ in it
    assert none == []


@pytest.mark.anyio
async def test_a_process_handler_defined_in_an_interactive_main_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    main = interactive_main(monkeypatch)
    handler = defined_in_main(main)()
    with anyio.fail_after(10):
        async with ev.EventBus(close_timeout=5) as bus:
            with pytest.raises(TypeError) as raised:
                bus.subscribe(handler, isolation="process", name="plot")
            bus.subscribe(handler)  # in a thread of this process it is fine
    text = str(raised.value)
    assert "'plot'" in text and "Handler" in text
    assert "__main__ of an interactive session (a notebook or `python -c`)" in text
    assert "Define it in a module" in text
