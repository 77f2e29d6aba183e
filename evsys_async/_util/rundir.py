"""Claiming directories: every run is a new run, for the run dir and for every
directory a logger owns.

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

A run key is printable text, at most :data:`MAX_KEY_BYTES` bytes in UTF-8 (a
directory name holds 255, and the key needs room for a ``-N``); ``/``
separates nested names (``sweep/lr=0.1``). Anything else (``../x``, an
absolute path, a newline, a right-to-left override, a leading space) is a
:class:`~evsys_async.errors.ConfigError` naming the key and a key that would
do, and so is an ``output_dir`` that cannot hold the run (a file, a read-only
file system): one line, never a traceback from ``pathlib``.

A logger with a directory of its own outside the run dir (a TensorBoard
``log_dir``) claims ``<dir>/<run_key>`` by the same rule
(:func:`claim_logger_dir`) and records what it claimed in the run dir's
``claims.json``, so a resume of the run finds the same directory even when
the claim took ``<run_key>-1``. A relative logger path means a place inside
the run dir (:func:`logger_path`), for a live run, a replay and a consumer alike.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
from pathlib import Path

from ..errors import ConfigError, describe
from .files import write_atomic
from .paths import expand_path

__all__ = [
    "CLAIMS_FILE",
    "MAX_KEY_BYTES",
    "check_inside",
    "check_run_key",
    "claim_logger_dir",
    "claim_run_dir",
    "logger_path",
    "read_claim",
    "record_claim",
]

#: a run key's longest form in UTF-8 bytes: a directory name holds 255, and the key
#: may grow by a ``-N`` suffix (and an experiment's ``-r<repeat>``)
MAX_KEY_BYTES = 200
#: where a run dir records the directories its loggers claimed outside it
CLAIMS_FILE = "claims.json"
#: one writer of a claims file at a time in this process (two loggers of one run)
_CLAIMS_LOCK = threading.Lock()


def check_run_key(run_key: str, output_dir: Path) -> None:
    """Raise :class:`ConfigError` unless ``run_key`` is a printable name inside ``output_dir``.

    A run key is printable text (no control or format characters: no newline,
    no right-to-left override), without leading or trailing spaces, at most
    :data:`MAX_KEY_BYTES` bytes in UTF-8; ``/`` separates nested names
    (``sweep/lr=0.1``), none of them empty, ``.`` or ``..``. The message names
    the key and one that would do.
    """
    plain = "".join(c if c.isalnum() or c in "-_." else "-" for c in run_key)
    plain = plain.strip(".-")[:64] or "run"
    parts = run_key.split("/")
    escapes = "\\" in run_key or any(part in ("", ".", "..") for part in parts)
    if escapes or Path(run_key).is_absolute():
        raise ConfigError(
            f"run_key {run_key!r} would put the run's files outside output_dir "
            f"{str(output_dir)!r}; a run key is a name inside it, such as {plain!r}"
        )
    bad = sorted({c for c in run_key if not c.isprintable()})
    if bad or any(part != part.strip() for part in parts):
        shown = ", ".join(repr(c) for c in bad[:5]) or "a leading or trailing space"
        raise ConfigError(
            f"run_key {run_key!r} holds characters a run key cannot have ({shown}); a run "
            f"key is printable text without control characters, such as {plain!r}"
        )
    size = len(run_key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise ConfigError(
            f"run_key {run_key[:40]!r}... is {size} bytes long in UTF-8; a run key is at "
            f"most {MAX_KEY_BYTES} (a directory name holds 255): choose a shorter one"
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
    :class:`ConfigError` (a ``ValueError``) for a bad key, a ``fixed`` clash, or
    an ``output_dir`` that cannot hold the run. Blocks on the file system.
    """
    check_run_key(run_key, output_dir)
    try:
        return _claim(output_dir, run_key, overwrite, resume, fixed, owner)
    except OSError as exc:
        raise _dir_error("output_dir", output_dir, exc, "--output-dir / output_dir=") from None


def _claim(
    output_dir: Path, run_key: str, overwrite: bool, resume: bool, fixed: bool, owner: bool
) -> tuple[str, Path]:
    path = output_dir / run_key
    if resume or not owner:
        path.mkdir(parents=True, exist_ok=True)
        return run_key, path
    if overwrite:
        _empty(path)
        return run_key, path
    if fixed:
        if path.is_dir() and any(not _rank_dir_made_now(p) for p in path.iterdir()):
            raise ConfigError(
                f"run directory {str(path)!r} holds another run's files, and with several "
                "ranks the run key cannot change; pass overwrite=True (CLI: --overwrite) "
                "to start it afresh, or another run key"
            )
        path.mkdir(parents=True, exist_ok=True)
        return run_key, path
    return _next_free(output_dir, run_key)


def _next_free(parent: Path, key: str) -> tuple[str, Path]:
    """``parent/key``, else ``parent/key-1``, ...: the first one this call created."""
    suffix = 0
    while True:
        name = key if suffix == 0 else f"{key}-{suffix}"
        candidate = parent / name
        try:
            candidate.mkdir(parents=True)  # atomic: exactly one claimant creates it
        except FileExistsError:
            if not parent.is_dir():
                raise NotADirectoryError(20, "Not a directory", str(parent)) from None
            suffix += 1
            continue
        return name, candidate


def _empty(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _dir_error(what: str, path: Path, exc: OSError, fix: str) -> ConfigError:
    """One line for a directory that cannot be used: the place, the problem, the fix."""
    if isinstance(exc, NotADirectoryError | FileExistsError):
        problem = "is a file, or lies under one, not a directory"
    elif isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        problem = f"is not writable ({describe(exc)})"
    else:
        problem = f"cannot be used ({describe(exc)})"
    return ConfigError(f"{what} {str(path)!r} {problem}; give a writable directory ({fix})")


def logger_path(path: str | os.PathLike[str], run_dir: Path, *, what: str) -> Path:
    """Where a logger's path parameter points: ``~`` and ``$VAR`` expanded; an absolute
    path as it is, a relative one inside ``run_dir``.

    Raises :class:`ConfigError` naming ``what`` for an unset variable, and for a
    relative path that leads out of the run dir (``../x``): write an absolute
    path to put files elsewhere.
    """
    expanded = expand_path(path, what=what)
    if expanded.is_absolute():
        return expanded
    inside = run_dir / expanded
    if ".." in expanded.parts and not _within(inside, run_dir):
        raise ConfigError(
            f"{what} {os.fspath(path)!r} leads out of the run directory {str(run_dir)!r}; "
            "a relative path is inside the run directory: give an absolute path to write "
            "elsewhere"
        )
    return inside


def check_inside(path: Path, *, what: str) -> Path:
    """Refuse, before any run, a relative logger path that leads out of whatever run
    directory it lands in (``../../x.csv``); return ``path``.

    Raises :class:`ConfigError` (a ``ValueError``: a config names its place) saying
    that a relative path is inside the run directory and an absolute one goes anywhere.
    """
    if not path.is_absolute() and os.path.normpath(path).split(os.sep)[0] == os.pardir:
        raise ConfigError(
            f"{what} {os.fspath(path)!r} leads out of the run directory; a relative path is "
            "inside the run directory (a replay's or a consumer's own, too): give an absolute "
            "path to write elsewhere"
        )
    return path


def _within(path: Path, root: Path) -> bool:
    return os.path.normpath(path).startswith(os.path.normpath(root) + os.sep)


def claim_logger_dir(
    root: Path,
    run_key: str,
    run_dir: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    what: str = "log_dir",
) -> Path:
    """Claim ``root/<run_key>`` for a logger (``root/<run_key>-1``, ... when taken) and
    record it in ``run_dir``'s :data:`CLAIMS_FILE`; return it.

    ``resume`` reuses what this run claimed before (else ``root/<run_key>``);
    ``overwrite`` empties and reuses ``root/<run_key>``. Raises
    :class:`ConfigError` naming ``what`` when ``root`` cannot hold it. Blocks on
    the file system: call it from ``setup``.
    """
    check_run_key(run_key, root)
    ident = os.path.normpath(os.path.abspath(root))
    try:
        earlier = read_claim(run_dir, ident)
        if resume:
            path = Path(earlier) if earlier else root / run_key
            path.mkdir(parents=True, exist_ok=True)
            return path
        if overwrite:
            path = root / run_key
            _empty(path)
        else:
            path = _next_free(root, run_key)[1]
    except OSError as exc:
        raise _dir_error(what, root, exc, f"another {what}") from None
    record_claim(run_dir, ident, str(path))
    return path


def read_claim(run_dir: Path, name: str) -> str | None:
    """What this run's logger ``name`` claimed, as :func:`record_claim` kept it."""
    return _read_claims(run_dir).get(name)


def record_claim(run_dir: Path, name: str, value: str) -> bool:
    """Keep in ``run_dir``'s :data:`CLAIMS_FILE` that logger ``name`` claimed ``value``
    (a directory, a tracking server's run id), so a resume finds it; written
    atomically, one writer at a time. ``False`` (and a WARNING) if it could not be."""
    with _CLAIMS_LOCK:
        claims = _read_claims(run_dir)
        claims[name] = value
        with contextlib.suppress(OSError):  # write_atomic then says why
            run_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(claims, indent=2, sort_keys=True) + "\n"
        return write_atomic(run_dir / CLAIMS_FILE, text)


def _read_claims(run_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((run_dir / CLAIMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
