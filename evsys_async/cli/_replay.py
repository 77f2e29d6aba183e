"""``evsys-async replay``, ``tail`` and ``consume``: events from elsewhere, to callbacks.

What this module promises: each command reads events another process wrote
(a run's ``events.jsonl``; a run's Redis stream), runs under the signal
handlers, blocks until its source has ended (or a signal stops it), prints
one report to ``out`` and returns the exit code. A Redis URL is printed
redacted. The Redis consumer is imported only when ``tail`` or ``consume`` runs.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import TYPE_CHECKING, TextIO

from .._util.signals import Interrupted, run_with_signals, signal_name
from ..config import load_callbacks
from ..errors import EventDecodeError
from ..replay import ReplayReport, replay
from ._stdio import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from ._summary import health_line

if TYPE_CHECKING:
    from ..consume import ConsumeResult, TailResult

__all__ = ["cmd_consume", "cmd_replay", "cmd_tail"]


def cmd_replay(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``evsys-async replay SOURCE --callbacks FILE``: the recorded events through the
    callbacks, then the report; 2 for a bad log or option, 1 if a callback failed."""
    if args.backend == "trio" and importlib.util.find_spec("trio") is None:
        print("evsys-async: --backend trio needs trio: pip install 'evsys-async[trio]'", file=err)
        return EXIT_USAGE
    callbacks = load_callbacks(args.callbacks)

    async def main() -> ReplayReport:
        return await replay(
            args.source,
            callbacks,
            only=args.only,
            speed=args.speed,
            skip_bad=args.skip_bad,
            output_dir=args.output_dir,
        )

    def on_signal(signum: int) -> None:
        print(
            f"\nevsys-async: {signal_name(signum)} received: stopping after the callbacks close "
            "(send it again to exit at once)",
            file=err,
            flush=True,
        )

    try:
        report: ReplayReport = run_with_signals(main, backend=args.backend, on_signal=on_signal)
    except Interrupted as exc:
        return exc.exit_code
    except EventDecodeError as exc:
        print(f"evsys-async: bad event log: {exc}", file=err)
        return EXIT_USAGE
    except (OSError, ValueError) as exc:  # a missing log, a bad --only
        text = str(exc)
        print(f"evsys-async: {'' if text.startswith('replay:') else 'replay: '}{text}", file=err)
        return EXIT_USAGE
    _print_replay(report, out)
    return EXIT_OK if report.ok else EXIT_FAILED


def _print_replay(report: ReplayReport, out: TextIO) -> None:
    counts = f"{report.events_read:,} events"
    if report.events_filtered:
        counts += f" ({report.events_published:,} published, {report.events_filtered:,} left out)"
    lines = ["", f"replayed {counts} from {report.source} in {report.seconds:.2f} s"]
    if report.segments > 1:
        lines.append(f"resumed runs: {report.segments - 1} resume boundary(ies) replayed as such")
    for name, close in report.only_unmatched.items():
        hint = f" — did you mean {close!r}?" if close else ""
        lines.append(f"--only {name}: no event of this type in the log{hint}")
    for kind, n in sorted(report.unknown_types.items()):
        lines.append(f"unknown event type {kind!r} ({n:,}): delivered to on_event as UnknownEvent")
    for skipped in report.skipped:
        lines.append(f"skipped line {skipped.line}: {skipped.reason}")
    if report.duplicates:
        lines.append(
            f"duplicates: {report.duplicates:,} envelope(s) repeated in the log (the same "
            "bus_id and seq as an earlier line) skipped"
        )
    if report.run_dir is not None:
        run_dir = report.run_dir
        files = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
        lines.append(f"files: {run_dir}/ ({', '.join(files) or 'none'})")
    if report.callback_report:
        lines.append("callbacks:")
        width = max(len(n) for n in report.callback_report)
        for name, h in report.callback_report.items():
            lines.append(f"  {name:<{width}}  {health_line(h)}")
    print("\n".join(lines), file=out, flush=True)


def cmd_tail(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``evsys-async tail URL RUN_KEY``: a run's progress lines from its Redis stream
    until every rank ended; 0 if each completed or stopped, 1 otherwise."""
    from ..consume import tail

    async def main() -> TailResult:
        return await tail(
            args.url,
            args.run_key,
            out=out,
            every=args.every,
            rank=args.rank,
            world_size=args.world_size,
            start="$" if args.from_now else "0",
            err=err,
        )

    try:
        result = run_with_signals(main, backend=args.backend)
    except Interrupted as exc:
        return exc.exit_code
    ok = result.ended and all(e.status in ("completed", "stopped") for e in result.ended.values())
    return EXIT_OK if ok else EXIT_FAILED


def cmd_consume(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``evsys-async consume URL RUN_KEY --group G --callbacks FILE``: the callbacks on
    the run's stream as a group member, then a report; 1 if a callback lost events."""
    from .._util.secrets import redact_url
    from ..consume import consume

    callbacks = load_callbacks(args.callbacks)

    async def main() -> ConsumeResult:
        return await consume(
            args.url,
            args.run_key,
            group=args.group,
            callbacks=callbacks,
            output_dir=args.output_dir,
            consumer=args.consumer,
            rank=args.rank,
            world_size=args.world_size,
            claim_after=args.claim_after,
        )

    try:
        result = run_with_signals(main, backend=args.backend)
    except Interrupted as exc:
        return exc.exit_code
    lines = [
        f"consumed {result.published} events of run {args.run_key} from "
        f"{redact_url(args.url)} (group {args.group})"
        + (f", resumed at step {result.resumed_at + 1}" if result.resumed_at is not None else ""),
    ]
    for rank, ended in sorted(result.ended.items()):
        who = f"rank {rank}" if len(result.ended) > 1 else "the run"
        reason = f": {ended.stop_reason}" if ended.stop_reason else ""
        lines.append(f"{who}: {ended.status} after {ended.steps_completed} steps{reason}")
    run_dir = result.run_dir
    files = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    lines.append(f"files: {run_dir}/ ({', '.join(files) or 'none'})")
    bad = False
    if result.callback_report:
        lines.append("callbacks:")
        width = max(len(n) for n in result.callback_report)
        for name, h in result.callback_report.items():
            bad |= bool(h.failed or h.stuck or h.pending)
            lines.append(f"  {name:<{width}}  {health_line(h)}")
    print("\n".join(lines), file=out, flush=True)
    return EXIT_FAILED if bad else EXIT_OK
