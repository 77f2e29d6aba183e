"""Sessions: the bus, the callbacks and their isolation for a trainer that is not ours.

:class:`Session` (``_session.py``) is the facade; ``_run.py`` is its run, made
of the loop's own phases; ``_thread.py`` the event loop a ``with`` session runs
in; ``_arguments.py`` its argument checks (docs/design.md, "A session").
"""

from ._session import Session

__all__ = ["Session"]
