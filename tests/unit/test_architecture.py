"""The import structure of `flora/` and `server/flora_server/`: no cycles between modules
(imports inside functions included), and every import allowed by the package table of
docs/architecture.md ("may import"). Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"flora": ROOT / "flora", "flora_server": ROOT / "server" / "flora_server"}
FIRST_PARTY = ("flora", "flora_server", "flora_client", "bench", "deploy")


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "flora.layers.base"
    path: Path
    is_package: bool


def modules() -> dict[str, Module]:
    found = {}
    for root in PACKAGES.values():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            found[".".join(parts)] = Module(".".join(parts), path, is_package)
    assert set(PACKAGES) <= set(found)
    return found


def imported_names(module: Module, known: dict[str, Module]) -> Iterator[tuple[str, int]]:
    """Every name `module` imports, resolved to a dotted absolute name, with its line."""
    for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.name.split(".")
                if not module.is_package:
                    base.pop()
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            else:
                prefix = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the submodule; `from mod import name`, mod.
                sub = f"{prefix}.{alias.name}"
                yield (sub if sub in known else prefix), node.lineno


def first_party_edges(known: dict[str, Module]) -> dict[str, set[str]]:
    """Module -> the project modules it imports. An import of a package's submodule is an
    edge to that submodule only (its parent packages are initialised first, as always)."""
    graph: dict[str, set[str]] = {}
    for name, module in known.items():
        targets = set()
        for imported, _ in imported_names(module, known):
            while imported and imported not in known:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_cycles_through_lazy_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules() -> None:
    found = cycles(first_party_edges(modules()))
    assert found == [], "import cycles (each list is one knot):\n" + "\n".join(map(str, found))


# --- the "may import" column of docs/architecture.md ----------------------------------------

TABLE_ROW = re.compile(r"^\|\s*`(?P<path>[\w/.]+/)`\s*\|(?P<owns>.*)\|(?P<may>[^|]*)\|\s*$")


def allowed_imports() -> dict[str, set[str]]:
    """Table path (e.g. "flora/serving/") -> the names it may import, its parents' included."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    listed: dict[str, set[str]] = {}
    for line in text.splitlines():
        if row := TABLE_ROW.match(line):
            cell = re.sub(r"\(.*?\)", "", row["may"]).replace("`", "")
            names = {n.strip() for n in cell.split(",")} - {"", "-"}
            listed[row["path"]] = names
    allowed = {}
    for path in listed:
        names: set[str] = set()
        for other, more in listed.items():
            if path.startswith(other):
                names |= more
        allowed[path] = names
    return allowed


def _table_path(module: Module) -> str:
    return f"{module.path.relative_to(ROOT).parent}/"


def test_every_import_is_allowed_by_the_architecture_table() -> None:
    allowed = allowed_imports()
    known = modules()
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = []
    for module in known.values():
        home = _table_path(module)
        rows = [p for p in allowed if home.startswith(p)]
        assert rows, f"{home} has no row in docs/architecture.md's package table"
        may = allowed[max(rows, key=len)]
        own = max(rows, key=len).rstrip("/").removeprefix("server/").replace("/", ".")
        for imported, line in imported_names(module, known):
            top = imported.split(".")[0]
            if top in stdlib or imported == own or imported.startswith(own + "."):
                continue
            if any(imported == m or imported.startswith(m + ".") for m in may):
                continue
            wrong.append(f"{module.path.relative_to(ROOT)}:{line} imports {imported}")
    assert wrong == [], "imports the table does not allow:\n" + "\n".join(sorted(wrong))


def test_the_library_may_never_import_the_server() -> None:
    # Data flows one way: whatever the table says, no row under flora/ may list the server.
    for path, names in allowed_imports().items():
        if path.startswith("flora/"):
            assert not any(n.startswith("flora_server") for n in names), path
