"""House rules that a reviewer would otherwise have to catch by eye, checked on the source.

* Every ``async def test_*`` waits under ``anyio.fail_after`` (or ``move_on_after``):
  a hang fails one test with a traceback at the wait, instead of the whole run
  timing out.
* No module of the package imports another module's private (underscore)
  names; from the package's private modules (``bus/_delivery/base.py`` ...) it imports
  only the names their ``__all__`` documents. Module seams are interfaces.
* Files are replaced in one place, ``_util/files.py`` (temp file, fsync, replace):
  no other module renames files into place.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "evsys_async"
TESTS = ROOT / "tests"

#: async tests that cannot wait under a fail_after, and why. Keep it short.
NO_FAIL_AFTER: dict[str, str] = {}

#: (module, name) imported from a private module without being in its __all__, and why
UNDOCUMENTED_IMPORTS: dict[tuple[str, str], str] = {}


def _calls(node: ast.AST) -> Iterator[str]:
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            yield f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def test_every_async_test_waits_under_fail_after() -> None:
    missing = []
    seen = 0
    for path in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.AsyncFunctionDef) and node.name.startswith("test_"):
                seen += 1
                where = f"{path.relative_to(ROOT)}::{node.name}"
                waits = {"fail_after", "move_on_after"} & set(_calls(node))
                if not waits and node.name not in NO_FAIL_AFTER:
                    missing.append(f"{where} (line {node.lineno})")
    assert seen > 100, "no async tests found: is TESTS right?"
    assert not missing, (
        "these async tests wait without a deadline; put their waits under "
        "`with anyio.fail_after(WAIT):` (or add them to NO_FAIL_AFTER, saying why):\n  "
        + "\n  ".join(missing)
    )


def test_the_fail_after_allowlist_names_real_tests() -> None:
    names = {
        node.name
        for path in TESTS.rglob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.AsyncFunctionDef)
    }
    assert set(NO_FAIL_AFTER) <= names, set(NO_FAIL_AFTER) - names


def _package_imports() -> Iterator[tuple[str, list[str], str]]:
    """(importing module, target module's parts under the package, imported name)."""
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG).with_suffix("").parts)
        package = parts[:-1]  # what `from .` means in this file
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                if node.level - 1 > len(package):
                    continue
                base = package[: len(package) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "evsys_async":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                yield ".".join(parts), target, alias.name


def _is_module(target: list[str], name: str) -> bool:
    base = PKG.joinpath(*target, name)
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def test_no_module_imports_another_modules_private_names() -> None:
    bad = []
    for importer, target, name in _package_imports():
        if _is_module(target, name):
            continue  # `from . import _builtins`: a module, not a name inside one
        private = name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
        if private:
            bad.append(f"{importer} imports {name} from {'.'.join(target) or 'evsys_async'}")
    assert not bad, (
        "a module's underscore names are its own; give the name a public spelling in its "
        "module (and its __all__) or keep the code that needs it there:\n  " + "\n  ".join(bad)
    )


def test_names_from_private_modules_are_the_ones_their_all_documents() -> None:
    bad = []
    used: set[tuple[str, str]] = set()
    for importer, target, name in _package_imports():
        if not target or not target[-1].startswith("_") or _is_module(target, name):
            continue
        if name.startswith("__"):
            continue  # __version__ and friends
        module = importlib.import_module(".".join(["evsys_async", *target]))
        documented = getattr(module, "__all__", None)
        key = (".".join(target), name)
        if documented is None or name not in documented:
            if key in UNDOCUMENTED_IMPORTS:
                used.add(key)
                continue
            bad.append(f"{importer} imports {name} from {'.'.join(target)}, not in its __all__")
    assert not bad, (
        "a private module's seam is its __all__: add the name there (with a docstring that "
        "says what it promises) or keep the code that needs it in that module:\n  "
        + "\n  ".join(bad)
    )
    stale = set(UNDOCUMENTED_IMPORTS) - used
    assert not stale, f"these UNDOCUMENTED_IMPORTS entries are fixed now; remove them: {stale}"


def test_files_are_replaced_only_through_the_atomic_helper() -> None:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "_util" / "files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("replace", "rename"):
                continue
            # os.replace(a, b) / os.rename(a, b); Path.replace(b) / Path.rename(b) take one
            # argument (str.replace takes two, msgspec.structs.replace keywords)
            on_os = getattr(node.func.value, "id", "") == "os"
            one_path = len(node.args) == 1 and not node.keywords
            if on_os or one_path:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, (
        "rename a file into place through evsys_async._util.files (write_atomic or "
        "atomic_writer: temp file, fsync, replace, failures never silent):\n  " + "\n  ".join(bad)
    )


def test_no_function_over_sixty_lines() -> None:
    """A function a reader can hold in one screen: at most 60 lines of body (its
    docstring not counted), everywhere in the package."""
    long: list[str] = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body
            if (
                len(body) > 1
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                body = body[1:]
            lines = (node.end_lineno or node.lineno) - body[0].lineno + 1
            if lines > 60:
                long.append(f"{path.relative_to(PKG.parent)}:{node.lineno} {node.name} ({lines})")
    assert not long, "split these functions: " + ", ".join(long)
