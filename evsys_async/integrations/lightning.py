"""Lightning: a ``Callback`` that runs evsys-async callbacks beside ``trainer.fit``.

``EvsysCallback(callbacks=[...], **session_options)`` is a thin layer on a
:class:`~evsys_async.Session` (docs/trainers.md). Lightning calls its hooks
inline, on the training thread; each hook here only publishes (never waits),
and the evsys-async callbacks run as isolated subscribers: a slow, failing,
hanging or crashing one never stalls ``fit``.

========================  ======================================================
Lightning                 session
========================  ======================================================
``on_fit_start``          the session starts (``TrainStarted``; rank and world
                          size from the trainer; with several ranks and no
                          ``coordinator=``, a ``TorchDistributedCoordinator``)
``on_train_batch_end``    ``step_ended(trainer.global_step - 1, metrics)`` after
                          each optimizer step: what ``self.log`` logged since
                          the last one (the new values in
                          ``trainer.callback_metrics``), and the scalars
                          ``training_step`` returned (its ``loss``); then a
                          stop the callbacks asked for becomes
                          ``trainer.should_stop``
``on_validation_end``     ``eval_ended(step, "val", metrics)``: what validation
                          logged (not during the sanity check)
``on_save_checkpoint``    ``checkpoint_saved(step, "epoch=E-step=S")``: Lightning
                          calls it before it writes the file, so no path
``on_fit_end``            the session ends: drain, report, ``manifest.json``
``on_exception``          the session ends ``failed`` (``cancelled`` for
                          ``KeyboardInterrupt``)
========================  ======================================================

Lightning is imported when this module is (extra ``lightning``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import import_extra
from ..session import Session
from ._values import plain, scalar, scalars

__all__ = ["EvsysCallback"]

_pl: Any = import_extra("lightning.pytorch", "lightning", "evsys_async.integrations.lightning")


class EvsysCallback(_pl.Callback):  # type: ignore[misc]
    """Runs ``callbacks`` (instances, kind names or specs, as a ``Session`` takes them)
    beside ``trainer.fit`` (see the module docstring).

    ``session_options`` go to the :class:`~evsys_async.Session` (``output_dir``,
    ``run_key``, ``config``, ``drain_timeout``, ``coordinator``, ...). Without
    ``config`` the run's hyperparameters are the module's ``hparams``.
    ``eval_name`` names validation's ``EvalEnded``. :attr:`session` is the running
    session, :attr:`artifacts` what the last fit left (a run's ``LoopArtifacts``).
    """

    def __init__(
        self,
        callbacks: Sequence[Any] | None = None,
        *,
        eval_name: str = "val",
        **session_options: Any,
    ) -> None:
        super().__init__()
        self.callbacks = list(callbacks or ())
        self.eval_name = eval_name
        self.session_options = session_options
        Session(self.callbacks, **session_options)  # bad options fail here, not inside fit
        self.session: Session | None = None
        self.artifacts: Any = None
        self._seen: dict[str, Any] = {}
        self._last_step = -1

    # -- start and end ------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        options = dict(self.session_options)
        if "config" not in options:
            options["config"] = plain(getattr(pl_module, "hparams", None) or {})
        if trainer.world_size > 1 and options.get("coordinator") is None:
            from ..transports.torch_coordinator import TorchDistributedCoordinator

            options["coordinator"] = TorchDistributedCoordinator()
        else:
            options.setdefault("rank", trainer.global_rank)
            options.setdefault("world_size", trainer.world_size)
        total = trainer.estimated_stepping_batches
        session = Session(
            self.callbacks,
            num_steps=int(total) if isinstance(total, int | float) and math.isfinite(total) else 0,
            start_step=trainer.global_step,
            **options,
        )
        session.state.model = pl_module
        self._seen = {}
        self._last_step = trainer.global_step - 1
        session.__enter__()
        self.session = session

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._end(None)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._end(exception)

    def _end(self, exc: BaseException | None) -> None:
        session, self.session = self.session, None
        if session is None:
            return
        try:
            session.__exit__(None if exc is None else type(exc), exc, None)
        finally:
            self.artifacts = session.artifacts

    # -- the steps ------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        session = self.session
        step = trainer.global_step - 1
        if session is None or step <= self._last_step:  # no optimizer step (accumulating)
            return
        self._last_step = step
        metrics = self._logged(trainer.callback_metrics)
        if outputs is not None:  # what training_step returned: its loss, unless logged
            for key, value in _outputs(outputs).items():
                if key not in metrics and scalar(value):
                    metrics[key] = value
        session.step_ended(step, metrics, batch=batch)
        if session.should_stop:
            trainer.should_stop = True

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.session is not None:
            self._logged(trainer.callback_metrics)  # what is there now is not validation's

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        session = self.session
        if session is None or trainer.sanity_checking:
            return
        metrics = self._logged(trainer.callback_metrics)
        session.eval_ended(max(trainer.global_step - 1, 0), self.eval_name, metrics)
        if session.should_stop:
            trainer.should_stop = True

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        if self.session is not None:
            step, epoch = trainer.global_step, trainer.current_epoch
            self.session.checkpoint_saved(
                max(step - 1, 0), f"epoch={epoch}-step={step}", epoch=epoch, global_step=step
            )

    def _logged(self, current: Mapping[str, Any]) -> dict[str, Any]:
        """The scalars of ``current`` (``trainer.callback_metrics``) logged since the last
        call: Lightning stores each newly logged value as a new tensor, so a value that
        is still the very object seen last time was not logged again."""
        seen = self._seen
        new = {}
        for key, value in current.items():
            if seen.get(key) is not value:
                seen[key] = new[key] = value
        return scalars(new) if new else new


def _outputs(outputs: Any) -> Mapping[str, Any]:
    """``training_step``'s return as a mapping: a lone tensor is its ``loss``."""
    return outputs if isinstance(outputs, Mapping) else {"loss": outputs}
