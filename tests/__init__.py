"""The test suite. Its tree mirrors the package's.

* ``tests/<package>/`` for each package of ``evsys_async`` (``_util``, ``events``, ``bus``
  with ``bus/delivery``, ``callbacks``, ``evaluators``, ``transports``, ``loop``,
  ``config``, ``cli``); ``tests/test_<module>.py`` for a module at the package's root.
* In a directory, ``test_<module>.py`` tests the module of that name (``bus/test_pump.py``
  tests ``bus/_pump.py``), and ``test_<package>.py`` the package through its public face
  (``bus/test_bus.py``: the ``EventBus``).
* ``examples/`` runs the scripts of ``examples/``; ``docs/`` checks the README and the
  pages of ``docs/``; the files at the root that name no module hold the whole package
  to its API reference and its house rules.
* Every directory is a package, so a test module is imported by its path
  (``tests.bus.delivery.test_base``, ``tests.evaluators.test_base``: two files may share
  a name), and so are the helpers: a directory's own (``tests.bus.helpers``,
  ``tests.loop.helpers``, ``tests.callbacks.helpers``, ``tests.transports.redis_server``)
  and those several directories share, at the root (``tests.servers``: ASGI servers and
  the examples as modules; ``tests.process_helpers``: what a callback's child process
  imports by that name).
* ``conftest.py``: the two backends, the ``slow`` mark, the session's own temp dir.
"""
