"""Bridges for trainers that are not ours: each a thin layer on a
:class:`~evsys_async.Session` (docs/trainers.md).

* ``evsys_async.integrations.lightning.EvsysCallback`` — a Lightning ``Callback``
  (extra ``lightning``);
* ``evsys_async.integrations.transformers.EvsysCallback`` — a Hugging Face
  ``TrainerCallback`` (extra ``transformers``).

Import the module you need: importing this package imports neither library.
"""
