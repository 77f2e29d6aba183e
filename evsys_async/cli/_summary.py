"""What the command line prints after a run: the summary, a sparkline per metric, the
callbacks' health, the evals that failed, the best eval.

What this module promises: :class:`EvalTracker` is a plain ``async`` bus
handler (no thread, no files) that only records, in flat memory whatever
the run's length (``callbacks/_picture.py``); :func:`health_line` says
``ok`` only for a callback that lost nothing (``CallbackHealth.ok``; a
``Latest`` callback's coalesced events are counted apart, as by design) and
otherwise names every problem; :func:`print_summary` writes one block to
``out`` and flushes it. Values print as the progress line prints them;
steps count from 1. Fields of the report that older runs or other producers
leave empty are read with their defaults.
"""

from __future__ import annotations

from typing import Any, ClassVar, TextIO

from ..callbacks._chart import sparkline
from ..callbacks._format import fmt_value, human_step
from ..callbacks._picture import RunPicture
from ..config import RunConfig
from ..events import EvalEnded, Event, StepEnded, TrainStarted
from ..state import CallbackHealth, EvalTally, LoopArtifacts

__all__ = ["EvalTracker", "health_line", "print_summary", "watched_metric"]

#: the widest sparkline, in characters
SPARK_WIDTH = 32


class EvalTracker:
    """Records the run's metrics for the summary (an ``async`` bus handler: no thread)."""

    #: what to subscribe it to
    EVENTS: ClassVar[tuple[type[Event], ...]] = (TrainStarted, StepEnded, EvalEnded)

    def __init__(self, watched: tuple[str, str, str | None] | None) -> None:
        #: (metric, mode, eval_name) that the summary calls "best"
        self.watched = watched
        self.picture = RunPicture(watched)

    async def __call__(self, event: Event) -> None:
        kind = type(event)
        if kind is StepEnded:
            self.picture.step(event.step, event.metrics)  # type: ignore[attr-defined]
        elif kind is EvalEnded:
            self.picture.eval(event.step, event.eval_name, event.metrics)  # type: ignore[attr-defined]
        elif kind is TrainStarted and self.watched is None:
            self.picture.started(event.config)  # type: ignore[attr-defined]

    def headline(self) -> str | None:
        """``val/pass_rate = 0.9420 (max, step 120)`` for the watched or first metric:
        named as in the files, the value as the progress line prints it, the step
        counted from 1."""
        best = self.picture.headline()
        if best is None:
            return None
        name, step, value, mode = best
        return f"{name} = {fmt_value(value)} ({mode}, step {step + 1})"

    def sparklines(self) -> list[str]:
        """``loss  ▇▅▃▂▁▁  1.0000 → 0.0100`` per metric (train first, then evals),
        with the best value of an eval metric."""
        picture = self.picture
        series = {**picture.train, **picture.evals}
        if not series:
            return []
        width = max(len(k) for k in series)
        lines = []
        for name, s in series.items():
            values = [v for _, v in s.points]
            last = picture.last_values.get(name)
            first = fmt_value(values[0]) if values else "?"
            end = fmt_value(last[1]) if last is not None else "?"
            spark = sparkline(values, SPARK_WIDTH)
            line = f"  {name:<{width}}  {spark:<{SPARK_WIDTH}}  {first} → {end}"
            if name in picture.best:
                step, value, _, _ = picture.best[name]
                line += f" (best {fmt_value(value)} at step {human_step(step)})"
            lines.append(line)
        return lines


def watched_metric(config: RunConfig) -> tuple[str, str, str | None] | None:
    """``(metric, mode, eval_name)`` of the config's early stopping, the metric the
    summary calls best; ``None`` when it has none."""
    for spec in config.callbacks:
        if spec.kind == "early_stopping" and "metric" in spec.params:
            params = spec.params
            return str(params["metric"]), str(params.get("mode", "max")), params.get("eval_name")
    return None


def health_line(h: CallbackHealth) -> str:
    """``ok (212 events)``, ``ok (113 events, 99 coalesced (by design))``, or every
    problem: ``3 failed``, ``hook failures: setup 1``, ``disabled: <why>``,
    ``degraded: <why>; 2,501 rows lost from step 489``, ..."""
    forced_drops = h.dropped - h.coalesced
    hook_failures: dict[str, int] = dict(getattr(h, "hook_failures", None) or {})
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
    if hook_failures:
        hooks = ", ".join(f"{hook} {n}" for hook, n in sorted(hook_failures.items()))
        problems.append(f"hook failures: {hooks}")
    degraded = getattr(h, "degraded", None)
    if degraded is not None:
        problems.append(f"degraded: {_degraded_text(degraded)}")
    if h.disabled:
        problems.insert(0, f"disabled: {h.disabled}")
    counts = f"{h.delivered} events"
    if h.coalesced:
        counts += f", {h.coalesced} coalesced (by design)"  # Latest keeps the newest
    return f"{'; '.join(problems) or 'ok'} ({counts})"


def _degraded_text(d: Any) -> str:
    text = str(getattr(d, "reason", d))
    lost = int(getattr(d, "rows_lost", 0) or 0)
    if lost:
        text += f"; {lost:,} rows lost"
        missing = getattr(d, "missing_from_step", None)
        if missing is not None:
            text += f" from step {human_step(missing)}"
    return text


def eval_lines(evals: dict[str, EvalTally]) -> list[str]:
    """``val: 2 of 20 evals failed: HTTP 422 ...`` for every evaluator that failed."""
    lines = []
    for name, tally in (evals or {}).items():
        if tally.failed:
            first = f": {tally.first_error}" if tally.first_error else ""
            lines.append(f"  {name}: {tally.failed} of {tally.runs} evals failed{first}")
    return lines


def print_summary(
    artifacts: LoopArtifacts, tracker: EvalTracker, out: TextIO, *, requested: str
) -> None:
    """The run's summary on ``out``: status (steps of the whole run, a resume
    included), stop reason, best eval, failed evals, a sparkline per metric, files
    (and why the run dir is not ``requested``), one health line per callback."""
    start = int(getattr(artifacts, "start_step", 0) or 0)
    done = start + artifacts.steps_completed
    resumed = f" (resumed at step {start + 1})" if start else ""
    lines = [
        "",
        f"status: {artifacts.status} — {done} of {artifacts.total_requested_steps} steps"
        f"{resumed} in {artifacts.train_seconds:.2f} s (shutdown {artifacts.drain_seconds:.2f} s)",
    ]
    if artifacts.stop_reason:
        lines.append(f"stop reason: {artifacts.stop_reason}")
    if artifacts.error:
        lines.append(f"error: {artifacts.error}")
    headline = tracker.headline()
    lines.append(f"best eval: {headline}" if headline else "best eval: (no evals ran)")
    failed_evals = eval_lines(getattr(artifacts, "evals", None) or {})
    if failed_evals:
        lines += ["evals:", *failed_evals]
    sparks = tracker.sparklines()
    if sparks:
        lines += ["metrics:", *sparks]
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
