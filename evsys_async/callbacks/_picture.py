"""``RunPicture``: what a run's summaries show, gathered from its events as they pass.

``local_logger`` feeds one to write ``summary.md`` (and the chart beside it);
the command line feeds one to print its end-of-run summary. It keeps, in
flat memory whatever the run's length: the hyperparameters
(``TrainStarted.config``), the last value of every metric, the best value of
every eval metric with its step, and a bounded :class:`~._chart.Series` per
metric for the chart and the sparklines.

"Best" is the lowest for a metric that is minimised, else the highest: the
early-stopping spec in the config says so for the metric it watches (its
``mode``); any other metric named like a loss, an error or a perplexity is
minimised. NaN is never best. Not thread-safe: one thread feeds it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import msgspec

from ._chart import Series, svg_chart
from ._format import eval_metric_name, fmt_value, human_step

__all__ = ["RunPicture", "lower_is_better", "watched_metric"]

#: at most this many panels in a chart, and rows in the hyperparameters' table
MAX_PANELS = 8
MAX_HPARAMS = 200

Watched = tuple[str, str, str | None]


def lower_is_better(key: str, watched: Watched | None = None) -> bool:
    """Whether the best value of ``key`` is its lowest (see the module docstring)."""
    if watched is not None and watched[0] == key:
        return watched[1] == "min"
    return any(word in key.lower() for word in ("loss", "err", "perplexity"))


def watched_metric(config: Mapping[str, Any]) -> Watched | None:
    """``(metric, mode, eval_name)`` of the early stopping among a run config's
    callback specs (``{"callbacks": [{"kind": ..., "params": ...}]}``), if any."""
    specs = config.get("callbacks")
    for spec in specs if isinstance(specs, list) else ():
        params = spec.get("params") if isinstance(spec, Mapping) else None
        if isinstance(params, Mapping) and spec.get("kind") == "early_stopping":
            if "metric" not in params:
                continue
            eval_name = params.get("eval_name")
            return str(params["metric"]), str(params.get("mode", "max")), eval_name
    return None


class RunPicture:
    """A run's summary data (see the module docstring)."""

    def __init__(self, watched: Watched | None = None, *, cap: int = 400) -> None:
        self.watched = watched
        self.cap = cap
        self.config: dict[str, Any] = {}
        self.train: dict[str, Series] = {}
        self.evals: dict[str, Series] = {}
        self.last: dict[str, tuple[int, float]] = {}
        #: eval metric name -> (step, value, eval name, key)
        self.best: dict[str, tuple[int, float, str, str]] = {}
        self._last_train: tuple[int, Mapping[str, float]] | None = None
        self._tick = -1
        self._stride = 1

    # -- fed with events ---------------------------------------------------------

    def started(self, config: Mapping[str, Any]) -> None:
        """``TrainStarted.config``: the hyperparameters (and the watched metric)."""
        self.config = dict(config)
        if self.watched is None:
            self.watched = watched_metric(self.config)

    def step(self, step: int, metrics: Mapping[str, float]) -> None:
        """A train step's metrics. Cheap: a step's values are sampled into the
        series every ``stride`` steps (one shared stride, doubled as they fill),
        and folded into the last values only when the keys change."""
        prev = self._last_train
        if prev is not None and prev[1].keys() != metrics.keys():
            self._fold(prev)
        self._last_train = (step, metrics)
        self._tick += 1
        if self._tick % self._stride:
            return
        series, full = self.train, False
        for key, value in metrics.items():
            s = series.get(key)
            if s is None:
                s = series[key] = Series(self.cap)
            s.points.append((step, value))
            full = full or len(s.points) >= self.cap
        if full:
            for s in series.values():
                s.points = s.points[::2]
            self._stride *= 2

    def _fold(self, train: tuple[int, Mapping[str, float]]) -> None:
        step, metrics = train
        for key, value in metrics.items():
            self.last[key] = (step, value)

    @property
    def last_values(self) -> dict[str, tuple[int, float]]:
        """The last value of every metric, with its step: train metrics first."""
        if self._last_train is not None:
            self._fold(self._last_train)
        train = {k: v for k, v in self.last.items() if k not in self.evals}
        return {**train, **{k: v for k, v in self.last.items() if k in self.evals}}

    def eval(self, step: int, eval_name: str, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            full = eval_metric_name(eval_name, key)
            self.evals.setdefault(full, Series(self.cap)).add(step, value)
            self.last[full] = (step, value)
            if math.isnan(value):
                continue
            old = self.best.get(full)
            lower = lower_is_better(key, self._watched_for(eval_name))
            if old is None or (value < old[1] if lower else value > old[1]):
                self.best[full] = (step, value, eval_name, key)

    def _watched_for(self, eval_name: str) -> Watched | None:
        w = self.watched
        return w if w is not None and w[2] in (None, eval_name) else None

    # -- read ----------------------------------------------------------------------

    def headline(self) -> tuple[str, int, float, str] | None:
        """``(name, step, value, mode)`` of the watched metric's best, else of the
        first eval metric's; ``None`` when no eval ran."""
        if not self.best:
            return None
        chosen = next(iter(self.best))
        if self.watched is not None:
            metric, _, eval_name = self.watched
            for full, (_, _, e, k) in self.best.items():
                if k == metric and eval_name in (None, e):
                    chosen = full
                    break
        step, value, e, k = self.best[chosen]
        mode = "min" if lower_is_better(k, self._watched_for(e)) else "max"
        return chosen, step, value, mode

    def chart_panels(self) -> list[tuple[str, list[tuple[int, float]]]]:
        """The training loss (the train metrics named like a loss, else the first
        one) and each eval metric, at most :data:`MAX_PANELS`."""
        train = [k for k in self.train if "loss" in k.lower()] or list(self.train)[:1]
        panels = [(k, self.train[k].points) for k in train]
        panels += [(k, s.points) for k, s in self.evals.items()]
        return panels[:MAX_PANELS]

    def svg(self, title: str, last_step: int | None) -> str | None:
        panels = self.chart_panels()
        if not any(any(math.isfinite(v) for _, v in pts) for _, pts in panels):
            return None
        return svg_chart(panels, title=title, last_step=last_step)

    def markdown(self, chart: str | None) -> list[str]:
        """The sections of ``summary.md`` after its head: best, last values,
        hyperparameters, the chart (``chart``: the SVG's file name)."""
        lines: list[str] = []
        if self.best:
            lines += ["", "## Best", "", "| metric | best | step | mode |", "|---|---|---|---|"]
            for full, (step, value, e, k) in self.best.items():
                mode = "min" if lower_is_better(k, self._watched_for(e)) else "max"
                lines.append(f"| {_md(full)} | {fmt_value(value)} | {human_step(step)} | {mode} |")
        last = self.last_values
        if last:
            lines += ["", "## Last values", "", "| metric | step | value |", "|---|---|---|"]
            lines += [
                f"| {_md(k)} | {human_step(s)} | {fmt_value(v)} |" for k, (s, v) in last.items()
            ]
        if self.config:
            lines += ["", "## Hyperparameters", "", "| name | value |", "|---|---|"]
            flat = list(_flatten(self.config))
            lines += [f"| {_md(k)} | {_md(v)} |" for k, v in flat[:MAX_HPARAMS]]
            if len(flat) > MAX_HPARAMS:
                lines.append(f"| … | {len(flat) - MAX_HPARAMS} more |")
        if chart:
            lines += ["", "## Chart", "", f"![the training loss and eval metrics by step]({chart})"]
        return lines


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``("optimizer.lr", "0.1")`` for every leaf of a nested config."""
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return
    if isinstance(value, str):
        yield prefix, value
        return
    yield prefix, msgspec.json.encode(value, enc_hook=str).decode()


def _md(text: str) -> str:
    """A table cell: pipes escaped, one line."""
    return text.replace("|", "\\|").replace("\n", " ")
