"""What the command line prints after a run: the summary, the callbacks' health, the best eval.

What this module promises: :class:`EvalTracker` is a plain ``async`` bus
handler (no thread, no files) that only records; :func:`health_line` says
``ok`` only for a callback that lost nothing (a ``Latest`` callback's
coalesced events are counted apart, as by design); :func:`print_summary`
writes one block to ``out`` and flushes it. Values print as the progress line
prints them; steps count from 1.
"""

from __future__ import annotations

import math
from typing import TextIO

from ..callbacks._format import eval_metric_name, fmt_value
from ..config import RunConfig
from ..events import EvalEnded
from ..state import CallbackHealth, LoopArtifacts

__all__ = ["EvalTracker", "health_line", "print_summary", "watched_metric"]


class EvalTracker:
    """Records each eval's metrics for the summary (an ``async`` bus handler: no thread)."""

    def __init__(self, watched: tuple[str, str, str | None] | None) -> None:
        #: (metric, mode, eval_name) that the summary calls "best"
        self.watched = watched
        self.best: dict[str, tuple[int, float]] = {}
        self._keys: dict[str, tuple[str, str]] = {}

    async def __call__(self, event: EvalEnded) -> None:
        for key, value in event.metrics.items():
            full = eval_metric_name(event.eval_name, key)
            self._keys[full] = (event.eval_name, key)
            if math.isnan(value):
                continue
            old = self.best.get(full)
            lower = self._lower_is_better(key)
            if old is None or (value < old[1] if lower else value > old[1]):
                self.best[full] = (event.step, value)

    def _lower_is_better(self, key: str) -> bool:
        if self.watched is not None and self.watched[0] == key:
            return self.watched[1] == "min"
        return any(word in key.lower() for word in ("loss", "err", "perplexity"))

    def headline(self) -> str | None:
        """``val/pass_rate = 0.9420 (max, step 120)`` for the watched or first metric:
        named as in the files, the value as the progress line prints it, the step
        counted from 1."""
        if not self.best:
            return None
        chosen = next(iter(self.best))
        if self.watched is not None:
            metric, _, eval_name = self.watched
            for full in self.best:
                e, k = self._keys[full]
                if k == metric and (eval_name is None or e == eval_name):
                    chosen = full
                    break
        step, value = self.best[chosen]
        mode = "min" if self._lower_is_better(self._keys[chosen][1]) else "max"
        return f"{chosen} = {fmt_value(value)} ({mode}, step {step + 1})"


def watched_metric(config: RunConfig) -> tuple[str, str, str | None] | None:
    """``(metric, mode, eval_name)`` of the config's early stopping, the metric the
    summary calls best; ``None`` when it has none."""
    for spec in config.callbacks:
        if spec.kind == "early_stopping" and "metric" in spec.params:
            params = spec.params
            return str(params["metric"]), str(params.get("mode", "max")), params.get("eval_name")
    return None


def health_line(h: CallbackHealth) -> str:
    """``ok (212 events)``, ``ok (113 events, 99 coalesced (by design))``, ``off: ...``,
    or what went wrong."""
    forced_drops = h.dropped - h.coalesced
    problems = [
        label
        for label, bad in (
            (f"{h.failed} failed", h.failed),
            (f"{forced_drops} dropped", forced_drops),
            (f"{h.pending} left unhandled", h.pending),
            ("stuck", h.stuck),
            (f"{h.control_timeouts} control timeouts", h.control_timeouts),
        )
        if bad
    ]
    counts = f"{h.delivered} events"
    if h.coalesced:
        counts += f", {h.coalesced} coalesced (by design)"  # Latest keeps the newest
    if h.disabled:
        problems.insert(0, f"off: {h.disabled}")
    return f"{'; '.join(problems) or 'ok'} ({counts})"


def print_summary(
    artifacts: LoopArtifacts, tracker: EvalTracker, out: TextIO, *, requested: str
) -> None:
    """The run's summary on ``out``: status, stop reason, best eval, files (and why the
    run dir is not ``requested``), one health line per callback."""
    lines = [
        "",
        f"status: {artifacts.status} — {artifacts.steps_completed} of "
        f"{artifacts.total_requested_steps} steps in {artifacts.train_seconds:.2f} s "
        f"(shutdown {artifacts.drain_seconds:.2f} s)",
    ]
    if artifacts.stop_reason:
        lines.append(f"stop reason: {artifacts.stop_reason}")
    if artifacts.error:
        lines.append(f"error: {artifacts.error}")
    headline = tracker.headline()
    lines.append(f"best eval: {headline}" if headline else "best eval: (no evals ran)")
    run_dir = artifacts.run_dir
    files = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    lines.append(f"files: {run_dir}/ ({', '.join(files) or 'none'})")
    if run_dir.name != requested:
        lines.append(
            f"  (a new run dir: {run_dir.parent / requested}/ holds another run's files; "
            "--overwrite reuses it)"
        )
    report = artifacts.callback_report
    if report:
        lines.append("callbacks:")
        width = max(len(n) for n in report)
        for name, h in report.items():
            lines.append(f"  {name:<{width}}  {health_line(h)}")
    print("\n".join(lines), file=out, flush=True)
