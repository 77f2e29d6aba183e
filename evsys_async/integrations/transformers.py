"""Hugging Face: a ``TrainerCallback`` that runs evsys-async callbacks beside ``Trainer.train``.

``EvsysCallback(callbacks=[...], **session_options)`` is a thin layer on a
:class:`~evsys_async.Session` (docs/trainers.md). The ``Trainer`` calls its
hooks inline, on the training thread; each hook here only publishes (never
waits), and the evsys-async callbacks run as isolated subscribers: a slow,
failing, hanging or crashing one never stalls training.

======================  ========================================================
``TrainerCallback``     session
======================  ========================================================
``on_train_begin``      the session starts (``TrainStarted``; the run's config
                        is ``args.to_sanitized_dict()`` unless ``config=`` is
                        given; rank and world size from ``args``; with several
                        ranks and no ``coordinator=``, a
                        ``TorchDistributedCoordinator``)
``on_log``              ``step_ended(state.global_step - 1, logs)``: the numbers
                        the ``Trainer`` logged (``loss``, ``grad_norm``,
                        ``learning_rate``, ``epoch``, ...); its eval logs go
                        through ``on_evaluate``, its end-of-training summary
                        (``train_runtime``, ...) is not a step
``on_evaluate``         ``eval_ended(step, "eval", metrics)``, the ``eval_``
                        prefix taken off
``on_save``             ``checkpoint_saved(step, "checkpoint-N", path)``
``on_step_end``         (and after the three above) a stop the callbacks asked
                        for becomes ``control.should_training_stop``
``on_train_end``        the session ends: drain, report, ``manifest.json``
======================  ========================================================

The ``Trainer`` has no hook for a failed ``train()``: call :meth:`EvsysCallback.close`
with the exception (``try: trainer.train() except BaseException as exc:
callback.close(exc); raise``) to end the session as ``failed``; otherwise it ends
when the process does, without its report. transformers is imported when this
module is (extra ``transformers``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import import_extra
from ..session import Session
from ._values import plain, scalars

__all__ = ["EvsysCallback"]

_hf: Any = import_extra("transformers", "transformers", "evsys_async.integrations.transformers")

#: keys of the ``Trainer``'s end-of-training log (a summary, not a step)
_SUMMARY = "train_runtime"


class EvsysCallback(_hf.TrainerCallback):  # type: ignore[misc]
    """Runs ``callbacks`` (instances, kind names or specs, as a ``Session`` takes them)
    beside ``Trainer.train`` (see the module docstring).

    ``session_options`` go to the :class:`~evsys_async.Session` (``output_dir``,
    ``run_key``, ``config``, ``drain_timeout``, ``coordinator``, ...).
    ``eval_name`` names the ``EvalEnded`` of ``Trainer.evaluate``. :attr:`session`
    is the running session, :attr:`artifacts` what the last ``train()`` left.
    """

    def __init__(
        self,
        callbacks: Sequence[Any] | None = None,
        *,
        eval_name: str = "eval",
        **session_options: Any,
    ) -> None:
        self.callbacks = list(callbacks or ())
        self.eval_name = eval_name
        self.session_options = session_options
        Session(self.callbacks, **session_options)  # bad options fail here, not inside fit
        self.session: Session | None = None
        self.artifacts: Any = None

    # -- start and end ------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        options = dict(self.session_options)
        if "config" not in options:
            options["config"] = plain(args.to_sanitized_dict())
        if args.world_size > 1 and options.get("coordinator") is None:
            from ..transports.torch_coordinator import TorchDistributedCoordinator

            options["coordinator"] = TorchDistributedCoordinator()
        else:
            options.setdefault("rank", args.process_index)
            options.setdefault("world_size", args.world_size)
        session = Session(
            self.callbacks,
            num_steps=max(int(state.max_steps or 0), 0),
            start_step=state.global_step,
            **options,
        )
        session.state.model = kwargs.get("model")
        session.__enter__()
        self.session = session

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self, exc: BaseException | None = None) -> None:
        """End the session (``failed`` with ``exc``, ``cancelled`` for a
        ``KeyboardInterrupt``); :attr:`artifacts` then holds the report. Idempotent."""
        session, self.session = self.session, None
        if session is None:
            return
        try:
            session.__exit__(None if exc is None else type(exc), exc, None)
        finally:
            self.artifacts = session.artifacts

    # -- the steps ------------------------------------------------------------------------

    def on_log(
        self, args: Any, state: Any, control: Any, logs: Mapping[str, Any] | None = None, **kw: Any
    ) -> None:
        session = self.session
        if session is None or not logs or _SUMMARY in logs:
            return
        values = scalars(logs)
        if any(key.startswith("eval_") for key in values):  # on_evaluate has them
            return
        session.step_ended(max(state.global_step - 1, 0), values)
        self._check(control)

    def on_evaluate(
        self,
        args: Any,
        state: Any,
        control: Any,
        metrics: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        session = self.session
        if session is None or not metrics:
            return
        values = {key.removeprefix("eval_"): v for key, v in scalars(metrics).items()}
        session.eval_ended(max(state.global_step - 1, 0), self.eval_name, values)
        self._check(control)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        session = self.session
        if session is not None:
            name = f"checkpoint-{state.global_step}"
            path = os.path.join(args.output_dir, name)
            step = max(state.global_step - 1, 0)
            session.checkpoint_saved(step, name, path, epoch=state.epoch)
            self._check(control)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._check(control)

    def _check(self, control: Any) -> None:
        session = self.session
        if session is not None and session.should_stop:
            control.should_training_stop = True
