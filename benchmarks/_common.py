"""Helpers shared by the benchmark scripts: medians with spread, tables, the machine.

The rules of every figure here: medians of at least 7 interleaved runs, the spread printed beside
the median, counts checked before anything is printed. Benchmarks only print;
nothing here asserts a wall-clock figure. A target is printed through
:func:`verdict`, and every script runs its ``main`` through :func:`run_main`,
which exits 1 when a printed target was missed (``--quick`` smoke runs in CI
included), so a FAIL on the screen is a failure for the shell as well.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence

__all__ = [
    "CountMismatch",
    "check_count",
    "fmt",
    "machine",
    "med",
    "print_table",
    "run_main",
    "spread",
    "verdict",
]

#: the targets missed so far in this process, as :func:`verdict` was told them
_missed: list[str] = []


class CountMismatch(AssertionError):
    """A no-op handler was not called as often as the benchmark published: the figure is void."""


def check_count(what: str, got: int, expected: int) -> None:
    """A figure counts only if every handler ran exactly as often as published."""
    if got != expected:
        raise CountMismatch(f"{what}: handlers counted {got} calls, expected {expected}")


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """min-max around the median, as a percentage of the median."""
    m = med(values)
    if not m:
        return "-"
    lo, hi = min(values), max(values)
    return f"-{(m - lo) / m * 100:.0f}/+{(hi - m) / m * 100:.0f}%"


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # NaN: not measured
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        cells = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print("| " + " | ".join(cells) + " |")


def machine() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    libs = []
    for dist in ("anyio", "trio", "msgspec"):
        with contextlib.suppress(PackageNotFoundError):
            libs.append(f"{dist} {version(dist)}")
    return (
        f"{os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]} "
        f"({platform.python_implementation()}), {platform.system()} {platform.release()}; "
        + ", ".join(libs)
    )


def verdict(ok: bool, what: str, *, words: tuple[str, str] = ("PASS", "FAIL")) -> str:
    """The word a benchmark prints for one target (``PASS``/``FAIL`` by default, or
    the table's own pair); a missed target is remembered, and :func:`run_main`
    exits 1 for it."""
    if not ok:
        _missed.append(what)
    return words[0] if ok else words[1]


def run_main(main: Callable[[], object]) -> None:
    """Run a benchmark's ``main()``; exit 1 when any target printed through
    :func:`verdict` was missed, naming them on stderr."""
    main()
    if _missed:
        sys.stdout.flush()
        print(f"\n{len(_missed)} target(s) missed: {'; '.join(_missed)}", file=sys.stderr)
        sys.exit(1)
