"""``python -m evsys_async``: the ``evsys-async`` command line."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
