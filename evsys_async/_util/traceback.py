"""Tracebacks that show the user's frames, not the runtime's.

A step that raises inside ``TrainingLoop.run()`` unwinds through the loop, the
step thread and anyio before it reaches the caller: a dozen frames of
machinery around the two that matter. :func:`user_traceback` keeps the frames
of the user's code (their step, their evaluator, a library they call) and
drops those of evsys-async's runtime, anyio, trio and asyncio; the exception
chain (``raise ... from ...``) is kept. When nothing but runtime frames is
left, the whole traceback is shown instead, so there is always a place to
look.
"""

from __future__ import annotations

import traceback
from types import TracebackType

__all__ = ["user_traceback"]

#: top-level modules whose frames are machinery around the user's code
_RUNTIME = frozenset(
    {"anyio", "trio", "outcome", "sniffio", "asyncio", "threading", "concurrent", "contextlib"}
)
#: evsys-async modules that hold user-facing code (the demo's step and evaluator)
_OURS_BUT_USER = ("evsys_async.demo",)


def _is_runtime(module: str) -> bool:
    if module.startswith("evsys_async"):
        return not module.startswith(_OURS_BUT_USER)
    return module.split(".", 1)[0] in _RUNTIME


def _frames(tb: TracebackType | None, *, everything: bool) -> traceback.StackSummary:
    walked = [
        (frame, lineno)
        for frame, lineno in traceback.walk_tb(tb)
        if everything or not _is_runtime(str(frame.f_globals.get("__name__", "")))
    ]
    return traceback.StackSummary.extract(iter(walked))


_CAUSE = "The above exception was the direct cause of the following exception:"
_CONTEXT = "During handling of the above exception, another exception occurred:"


def _chain(exc: BaseException) -> list[tuple[BaseException, str | None]]:
    """Oldest first: each exception with the sentence that leads to the next one."""
    out: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        out.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    out.reverse()
    return out


def user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as text, the user's frames only (see the module docstring)."""
    chain = _chain(exc)
    everything = not any(len(_frames(e.__traceback__, everything=False)) for e, _ in chain)
    parts: list[str] = []
    for e, link in chain:
        stack = _frames(e.__traceback__, everything=everything)
        if len(stack):
            parts.append("Traceback (most recent call last):\n")
            parts.extend(stack.format())
        parts.extend(traceback.format_exception_only(e))
        if link is not None:
            parts.append(f"\n{link}\n\n")
    return "".join(parts)
