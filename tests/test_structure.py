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


def _library_files() -> list[Path]:
    "The library's modules, without nbdev's generated index (`_modidx.py` is nbdev's, not ours to wrap)."
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "_modidx.py")


def test_no_library_function_is_longer_than_a_screen():
    too_long = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                too_long.append(f"{_module_name(path)}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "functions over 60 lines: " + ", ".join(too_long)


def test_library_lines_are_wrapped_at_120():
    lines = [l for p in _library_files() for l in p.read_text(encoding="utf-8").splitlines()]
    long = sum(len(l) > 120 for l in lines)
    assert long/len(lines) < 0.02, f"{long} of {len(lines)} library lines ({long/len(lines):.1%}) are over 120 characters"
