"""docs/design.md's layer table is the tree, and the import graph keeps to it.

* Every package and module of ``evsys_async`` is a row of the table in "The layers",
  every row names something that exists, and a package's rows are together, in
  ``ls`` order, in one layer.
* The import graph (every ``import`` in every file: at the top, inside functions,
  under ``TYPE_CHECKING``) has no strongly connected component of more than one
  module: no import cycle anywhere, annotation-only imports included.
* Imports point one way: a module imports only modules of its own layer and of the
  layers listed before it in the table.
* A built-in callback never imports the bus, the loop, the callbacks' runtime or
  another built-in.
* Every section of docs/design.md that a comment or docstring cites exists.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "evsys_async"
DESIGN = ROOT / "docs" / "design.md"
#: the section of docs/design.md that holds the layer table
TABLE_SECTION = "The layers"
WHERE = f'docs/design.md ("{TABLE_SECTION}")'


# -- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    layer: str
    #: its place among the layers, lowest first
    rank: int
    #: as in the table: ``errors.py``, ``bus/``, ``bus/_delivery/wire.py``
    path: str
    #: line in docs/design.md
    line: int


def _section(text: str, title: str) -> tuple[str, int]:
    """The body of ``## title`` and the line its heading is on."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {title}"), None)
    assert start is not None, (
        f"docs/design.md has no section '## {title}': the layer table lives there "
        "(tests/test_design.py reads it)"
    )
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start:end]), start + 1


_ROW = re.compile(r"^\|\s*(?P<layer>[^|`]*?)\s*\|\s*`(?P<path>[^`]+)`\s*\|.*\|\s*$")


def table() -> list[Row]:
    """The rows of the layer table, in order (a row whose first cell is empty is in the
    layer of the row before it)."""
    body, first = _section(DESIGN.read_text(encoding="utf-8"), TABLE_SECTION)
    rows: list[Row] = []
    layers: list[str] = []
    for offset, line in enumerate(body.splitlines()):
        m = _ROW.match(line)
        if m is None:
            continue
        name = m["layer"].strip("* ")
        where = f"docs/design.md:{first + offset}"
        if name:
            assert name not in layers, f"{where}: the layer {name!r} is named twice; name it once"
            layers.append(name)
        assert layers, f"{where}: the table's first row must name its layer"
        rows.append(Row(layers[-1], len(layers) - 1, m["path"], first + offset))
    assert rows, f"{WHERE} holds no table rows like '| **layer** | `path` | what it holds |'"
    return rows


def tree() -> set[str]:
    """Every package (``bus/``) and file of ``evsys_async`` as the table names them: a
    subpackage's ``__init__.py`` is its package's row, the root's is ``__init__.py``."""
    found: set[str] = set()
    for p in PKG.rglob("*"):
        rel = p.relative_to(PKG)
        if "__pycache__" in rel.parts or p.suffix in (".pyc", ".pyo"):
            continue
        if p.is_dir():
            found.add(f"{rel.as_posix()}/")
        elif p.name != "__init__.py" or p.parent == PKG:
            found.add(rel.as_posix())
    return found


def test_the_layer_table_names_every_package_and_module() -> None:
    rows = table()
    named = [r.path for r in rows]
    twice = sorted({p for p in named if named.count(p) > 1})
    assert not twice, f"{WHERE} names these twice; keep one row each: {twice}"
    missing = sorted(tree() - set(named))
    assert not missing, (
        f"{WHERE} does not name {missing}: add a row for each, with its package's rows "
        "(in `ls` order) or, for a root module, in the layer it belongs to, saying in "
        "one line what it holds"
    )


def test_the_layer_table_names_nothing_that_does_not_exist() -> None:
    gone = [f"{r.path} (docs/design.md:{r.line})" for r in table() if r.path not in tree()]
    assert not gone, (
        f"{WHERE} names what is not in evsys_async/: {gone}; remove those rows, or fix "
        "the path (a package ends in '/', a module in '.py', relative to evsys_async/)"
    )


def test_a_packages_rows_are_together_in_ls_order_in_one_layer() -> None:
    rows = table()
    for package in sorted({r.path.split("/")[0] for r in rows if "/" in r.path}):
        mine = [(i, r) for i, r in enumerate(rows) if r.path.startswith(f"{package}/")]
        paths = [r.path for _, r in mine]
        where = f"{WHERE}, the rows of {package}/"
        assert paths == sorted(paths), (
            f"{where} must read as `ls` does (the package, then its entries sorted, a "
            f"subpackage's right after its own row): {sorted(paths)}"
        )
        indexes = [i for i, _ in mine]
        assert indexes == list(range(indexes[0], indexes[0] + len(indexes))), (
            f"{where} must be together, one after another; other rows sit between them"
        )
        layers = sorted({r.layer for _, r in mine})
        assert len(layers) == 1, (
            f"{where} are in layers {layers}: a package is one layer; move the rows, or "
            "make the package two"
        )


# -- the import graph ------------------------------------------------------------------


def module_name(path: Path) -> str:
    """``evsys_async.bus._delivery.wire`` for ``evsys_async/bus/_delivery/wire.py``."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    #: where: ``evsys_async/loop/_run.py:34``
    at: str


def _targets(
    node: ast.Import | ast.ImportFrom, package: list[str], known: set[str]
) -> Iterator[str]:
    """The package's modules one import statement imports (the nearest module that
    exists, for a name that is not a module: ``from ..bus import EventBus`` is
    ``evsys_async.bus``)."""

    def nearest(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name.split(".")[0] == PKG.name and (found := nearest(alias.name)):
                yield found
        return
    if node.level:
        base = package[: len(package) - (node.level - 1)]
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
    elif node.module and node.module.split(".")[0] == PKG.name:
        target = node.module
    else:
        return
    for alias in node.names:
        if (found := nearest(f"{target}.{alias.name}")) is not None:
            yield found


def import_graph() -> dict[str, list[Edge]]:
    """Module -> the imports of the package's modules it makes, every one counted: at
    the top, inside functions, under ``if TYPE_CHECKING:``."""
    mods = modules()
    known = set(mods)
    graph: dict[str, list[Edge]] = {m: [] for m in mods}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _targets(node, package, known):
                    if target != mod:
                        graph[mod].append(Edge(mod, target, f"{rel}:{node.lineno}"))
    return graph


def strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """The strongly connected components of the graph (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work: list[tuple[str, Iterator[Edge]]] = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next((e.target for e in edges), None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                found.append(sorted(component))
    return found


def _a_cycle(graph: dict[str, list[Edge]], component: list[str]) -> list[Edge]:
    """One cycle through the component's first module, as the imports that make it."""
    inside = set(component)
    start = component[0]
    came: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in graph[v]:
                if e.target in inside and e.target not in came:
                    came[e.target] = e
                    nxt.append(e.target)
        if start in came:
            break
        frontier = nxt
    path = [came[start]]
    while path[-1].source != start:
        path.append(came[path[-1].source])
    return path[::-1]


def _short(module: str) -> str:
    return module.removeprefix(f"{PKG.name}.") if module != PKG.name else "evsys_async"


def test_the_import_graph_sees_imports_at_every_depth() -> None:
    """The check below is only as good as the graph: a late import and an annotation-only
    import are edges too."""
    graph = import_graph()
    late = {e.target for e in graph["evsys_async.loop._loop"]}
    assert "evsys_async._util.signals" in late  # imported inside run_sync()
    assert len(strongly_connected({"a": [Edge("a", "b", "")], "b": [Edge("b", "a", "")]})) == 1


def test_no_import_cycle_anywhere() -> None:
    graph = import_graph()
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    described = []
    for component in cycles:
        path = _a_cycle(graph, component)
        steps = "; ".join(f"{e.at} imports {_short(e.target)}" for e in path)
        described.append(f"{', '.join(map(_short, component))} ({steps})")
    assert not cycles, (
        "these modules import each other (every import counts: inside a function and "
        "under TYPE_CHECKING too). Break each cycle: move what both need into a module "
        "below both, or have the lower one declare a Protocol or take a callable that "
        "the higher one passes in:\n  " + "\n  ".join(described)
    )


def _layer_of(rows: list[Row]) -> dict[str, Row]:
    """Module name -> its row in the table."""
    out = {}
    for r in rows:
        if r.path.endswith("/"):
            out[f"{PKG.name}.{r.path.rstrip('/').replace('/', '.')}"] = r
        elif r.path.endswith(".py"):
            stem = r.path.removesuffix(".py").replace("/", ".")
            out[PKG.name if stem == "__init__" else f"{PKG.name}.{stem}"] = r
    return out


def test_imports_point_one_way_in_the_order_of_the_layer_table() -> None:
    rows = table()
    row_of = _layer_of(rows)
    graph = import_graph()
    unplaced = sorted(_short(m) for m in graph if m not in row_of)
    assert not unplaced, f"{WHERE} does not place {unplaced}: add a row for each"
    against = []
    for mod, edges in sorted(graph.items()):
        mine = row_of[mod]
        for e in edges:
            theirs = row_of[e.target]
            if theirs.rank > mine.rank:
                against.append(
                    f"{e.at} imports {_short(e.target)} (layer {theirs.layer!r}), but "
                    f"{mine.path} is in layer {mine.layer!r}, listed before it"
                )
    assert not against, (
        f"imports against the order of the layers in {WHERE}: a module imports only "
        "modules of its own layer and of the layers listed before it. Move what it needs "
        "down, or pass it in (a Protocol the lower module declares, a callable); if it "
        "is the table that is wrong, move the row.\n  " + "\n  ".join(against)
    )


# -- the built-in callbacks ------------------------------------------------------------

#: the modules of ``callbacks/`` that are not built-ins (nor its private runtime)
CALLBACK_FRAMEWORK = ("base", "registry")
#: what a built-in may use of its own package, beside ``base`` and ``registry``
BUILTIN_HELPERS = (
    "_chart",
    "_format",
    "_hparams",
    "_mlflow",
    "_picture",
    "_tfevents",
    "_values",
    "_writer",
)


def builtins() -> list[str]:
    """The built-in callbacks: every public module of ``callbacks/`` but the base class
    and the registry (one callback class each)."""
    return sorted(
        f"{PKG.name}.callbacks.{p.stem}"
        for p in (PKG / "callbacks").glob("*.py")
        if not p.stem.startswith("_") and p.stem not in CALLBACK_FRAMEWORK
    )


def _off_limits_to_a_built_in(target: str) -> bool:
    """The bus, the loop (or the bus's public path ``subscription``), and any module of
    ``callbacks/`` but the base class, the registry and the built-ins' helpers."""
    forbidden = tuple(f"{PKG.name}.{p}" for p in ("bus", "loop", "subscription"))
    if target in forbidden or target.startswith(tuple(f"{f}." for f in forbidden)):
        return True
    allowed_here = {f"{PKG.name}.callbacks.{m}" for m in (*CALLBACK_FRAMEWORK, *BUILTIN_HELPERS)}
    return target.startswith(f"{PKG.name}.callbacks") and target not in allowed_here


def test_a_built_in_imports_no_bus_no_loop_no_runtime_and_no_other_built_in() -> None:
    found = builtins()
    assert f"{PKG.name}.callbacks.csv_metrics" in found  # the check sees the built-ins
    graph = import_graph()
    bad = [
        f"{e.at} imports {_short(e.target)}"
        for mod in found
        for e in graph[mod]
        if _off_limits_to_a_built_in(e.target)
    ]
    assert not bad, (
        "a built-in callback imports neither the bus, nor the loop, nor the callbacks' "
        "runtime (_adapter, _runner, _remote, _requests, _hooks, _dispatch), nor another "
        "built-in; of its package only base, registry and the helpers in BUILTIN_HELPERS. It "
        "reaches "
        f"its run through LoopState and its hooks ({WHERE}):\n  " + "\n  ".join(bad)
    )


# -- sections that comments cite -------------------------------------------------------

_CITED = re.compile(r"design\.md`{0,2}[\s,(]*((?:\"[^\"]+\"(?:\s*(?:,|and|;)\s*)?)+)")


def _citations() -> Iterator[tuple[str, str]]:
    """``(where, section)`` for every ``docs/design.md, "Section"`` in the package's and
    the tests' sources (a comment continued over lines is read as one)."""
    for path in [*PKG.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        for found in re.finditer(r"design\.md", text):
            chunk = re.sub(r"\n\s*(#\s*)?", " ", text[found.start() : found.start() + 300])
            m = _CITED.match(chunk)
            if m is None:
                continue
            line = text.count("\n", 0, found.start()) + 1
            where = f"{path.relative_to(ROOT)}:{line}"
            for section in re.findall(r"\"([^\"]+)\"", m[1]):
                yield where, " ".join(section.split())


def test_every_section_a_comment_cites_exists() -> None:
    headings = [
        m.group(1).strip()
        for m in re.finditer(r"^#{2,4} (.+)$", DESIGN.read_text(encoding="utf-8"), re.M)
    ]
    cited = list(_citations())
    assert any(s == "How an event travels" for _, s in cited)  # the check sees citations
    unknown = [
        f'{where}: "{section}"'
        for where, section in cited
        if not any(h == section or h.startswith(f"{section},") for h in headings)
    ]
    assert not unknown, (
        "these comments cite sections docs/design.md does not have; point them at a "
        f"section it has ({'; '.join(headings)}), or add the section:\n  " + "\n  ".join(unknown)
    )
