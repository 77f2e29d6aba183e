"""Claiming a run directory: every run is a new run.

A run writes into ``<output_dir>/<run_key>/``. It never writes into a run
directory that holds another run's files: when ``demo`` exists it takes
``demo-1``, then ``demo-2``, ... — the convention of Lightning, W&B and
MLflow — and the key it claimed is the run key everywhere (events, files,
``loop.run_key``). A directory is claimed by creating it (``os.mkdir`` is
atomic), so two runs started at once never share one.

Two exceptions: ``overwrite=True`` reuses ``<run_key>/``, emptied first, and a
resumed run (``start_step > 0``) reuses it as it is. With several ranks
(``world_size > 1``) the key is never changed — every rank must agree on it —
so rank 0 refuses a directory that holds files unless ``overwrite`` or a
resume says otherwise (the empty ``rank-<n>`` directories other ranks of the
run may have made first do not count).

A key that would put files outside ``output_dir`` (``../x``, an absolute
path) is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["check_run_key", "claim_run_dir"]


def check_run_key(run_key: str, output_dir: Path) -> None:
    """Raise ``ValueError`` if ``run_key`` would lead outside ``output_dir``."""
    key = Path(run_key)
    escapes = key.is_absolute() or ".." in key.parts or not key.parts
    if not escapes:
        root = output_dir.resolve()
        escapes = not (root / key).resolve().is_relative_to(root)
    if escapes:
        plain = "".join(c if c.isalnum() or c in "-_." else "-" for c in key.name).strip(".-")
        raise ValueError(
            f"run_key {run_key!r} would put the run's files outside output_dir "
            f"{str(output_dir)!r}; a run key is a name inside it, such as {plain or 'run'!r}"
        )


def _rank_dir_made_now(path: Path) -> bool:
    """An empty ``rank-<n>`` directory: another rank of this run got here first (each
    rank other than 0 has its own inside the run's; docs/distributed.md, "Ranks")."""
    name = path.name
    if not (name.startswith("rank-") and name[5:].isdigit() and path.is_dir()):
        return False
    return not any(path.iterdir())


def claim_run_dir(
    output_dir: Path,
    run_key: str,
    *,
    overwrite: bool = False,
    resume: bool = False,
    fixed: bool = False,
    owner: bool = True,
) -> tuple[str, Path]:
    """Claim ``output_dir/run_key`` (or the next free ``run_key-N``); return the key and dir.

    ``overwrite`` empties and reuses it; ``resume`` reuses it as it is; ``fixed``
    (several ranks) never changes the key and refuses a directory holding files;
    ``owner=False`` (a rank other than 0) only makes sure it exists. Raises
    ``ValueError`` for a key that escapes ``output_dir`` or a ``fixed`` clash.
    """
    check_run_key(run_key, output_dir)
    path = output_dir / run_key
    if resume or not owner:
        path.mkdir(parents=True, exist_ok=True)
        return run_key, path
    if overwrite:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        return run_key, path
    if fixed:
        if path.is_dir() and any(not _rank_dir_made_now(p) for p in path.iterdir()):
            raise ValueError(
                f"run directory {str(path)!r} holds another run's files, and with several "
                "ranks the run key cannot change; pass overwrite=True (CLI: --overwrite) "
                "to start it afresh, or another run key"
            )
        path.mkdir(parents=True, exist_ok=True)
        return run_key, path
    suffix = 0
    while True:
        key = run_key if suffix == 0 else f"{run_key}-{suffix}"
        candidate = output_dir / key
        try:
            candidate.mkdir(parents=True)  # atomic: exactly one run creates it
        except FileExistsError:
            suffix += 1
            continue
        return key, candidate
