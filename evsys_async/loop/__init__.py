"""The training loop: one run's steps, evaluators and checkpoints, published as events.

:class:`TrainingLoop` is the facade (``_loop.py``); everything else here is
one run and its phases, each module one concept (docs/design.md, "A run" and
"The shutdown"), imports pointing down this list:

* ``_settings``: ``RunSettings``, a run's fixed settings (frozen), and the
  ``StepFn``/``CheckpointFn`` types;
* ``_metrics``: a step's or an evaluator's metrics as plain floats;
* ``_step_thread``: where ``def`` steps and ``def`` checkpoint functions run;
* ``_barrier``: the control barrier for callbacks that steer the loop;
* ``_evals``, ``_checkpoints`` (with what a resume takes back): the work of a
  step boundary;
* ``_boundary``: whether a step boundary has work (``Plan``), and passing it;
* ``_steps``: ``TrainStarted`` and the steps, ``async def`` or in the step thread;
* ``_runfiles``: what a run writes itself (``hparams.yaml``, ``manifest.json``,
  ``error.txt``);
* ``_shutdown``: the one way every run ends, its phases one function each;
* ``_subscribers``, ``_control``: the loop's subscribers, and its stop, cancel
  and subscribers reachable from any thread around its runs;
* ``_run``: ``Run``, what the phases share, which each sees through a narrow
  ``Protocol`` of what it uses;
* ``_host``: a run on an event loop of its own (``run(own_thread=True)``);
* ``_arguments``, ``_loop``: the facade's argument checks, and the facade.
"""

from ._loop import TrainingLoop
from ._settings import CheckpointFn, StepFn
from ._subscribers import LoopSubscription

__all__ = ["CheckpointFn", "LoopSubscription", "StepFn", "TrainingLoop"]
