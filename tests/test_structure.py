"""The library's shape: modules import each other in one direction, and the benchmarks sit on top.

Imports inside functions count as much as those at the top of a module: a lazy import still ties the
two modules together, and a cycle through one is still a cycle a reader has to untangle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT/"ptm_course"
TOP_LAYER = {"bench", "cli"}  # nothing in the library imports these (cli is the command; bench the benchmarks)


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    "The names `path` imports from ptm_course, anywhere in it (filtered to real modules by `import_graph`)."
    found, package = set(), _module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("ptm_course.") for a in node.names if a.name.startswith("ptm_course.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .core import x; from ..exercises import y; from . import data
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module == "ptm_course" or (node.module or "").startswith("ptm_course."):
                target = node.module.removeprefix("ptm_course").lstrip(".")
            else:
                continue
            found.add(target)
            found |= {".".join(filter(None, (target, a.name))) for a in node.names}  # names that are modules
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if p.name not in {"__init__.py", "_modidx.py"}}
    return {name: {t for t in _imports(path) if t in modules and t != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []
    def visit(node):
        state[node] = "open"; stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open": return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)): return found
        state[node] = "done"; stack.pop()
        return None
    for node in sorted(graph):
        if node not in state and (found := visit(node)): return found
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "core" in graph["data"] and "data" in graph["vision"]
    assert "compress" in graph["bench"]  # bench imports chapter 7's functions inside its benchmark


def test_the_library_has_no_import_cycle():
    assert _cycle(import_graph()) is None, f"import cycle: {' -> '.join(_cycle(import_graph()))}"


def test_nothing_in_the_library_imports_the_top_layer():
    graph = import_graph()
    offenders = {m: sorted(graph[m] & TOP_LAYER) for m in graph if m not in TOP_LAYER and graph[m] & TOP_LAYER}
    assert not offenders, f"modules that import the benchmarks or the command: {offenders}"
