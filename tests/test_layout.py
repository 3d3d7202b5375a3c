"""The code's shape: small files and functions, a jax-free planner and router, no import cycles.

    jaxserve/**/*.py --line count--> <= MAX_FILE_LINES each
                     --ast FunctionDef/AsyncFunctionDef (end_lineno - lineno + 1)--> <= MAX_FUNCTION_LINES each
    planner/**/*.py  --ast Import/ImportFrom, anywhere in the file--> none of FORBIDDEN_IN_PLANNER
    ``import jaxserve.runtime.router`` / every planner module, in a fresh interpreter --> no jax loaded
    jaxserve/ + planner/ --module-level imports (not inside functions, not under ``if TYPE_CHECKING``)-->
                     import graph --> acyclic
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxserve", "planner")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
FORBIDDEN_IN_PLANNER = ("jaxserve.engine", "jaxserve.parallel", "jaxserve.cluster", "jaxserve.runtime", "jax")


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_no_file_over_the_line_limit():
    long = {_rel(p): n for p in _files("jaxserve") if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by concept): {long}"


def test_no_function_over_the_line_limit():
    long = {}
    for p in _files("jaxserve"):
        for node in ast.walk(_tree(p)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{_rel(p)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (extract helpers): {long}"


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute names an import statement in ``module`` may load: the module, and ``pkg.name`` for
    ``from pkg import name`` (a submodule when it is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names if a.name != "*"]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in function bodies, not under TYPE_CHECKING
    (class bodies, try/except, if/else and with blocks do run)."""
    for stmt in body:
        if isinstance(stmt, ast.Import | ast.ImportFrom):
            yield stmt
        elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        elif isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            yield from _module_level_imports(stmt.orelse)
        else:
            for child in ast.iter_child_nodes(stmt):
                if isinstance(child, ast.stmt):
                    yield from _module_level_imports([child])
                elif isinstance(child, ast.ExceptHandler | ast.match_case):
                    yield from _module_level_imports(child.body)


def _forbidden(name: str) -> str | None:
    return next((f for f in FORBIDDEN_IN_PLANNER if name == f or name.startswith(f + ".")), None)


def test_planner_imports_no_jax_and_no_engine():
    bad = []
    for p in _files("planner"):
        module = _module_name(p)
        for node in ast.walk(_tree(p)):
            if isinstance(node, ast.Import | ast.ImportFrom):
                hits = {f for n in _imported(node, module, p.name == "__init__.py") if (f := _forbidden(n))}
                bad += [f"{_rel(p)}:{node.lineno} imports {f}" for f in sorted(hits)]
    assert not bad, "planner/ must stay pure Python + numpy (profiling lives in jaxserve.profiling):\n" + \
        "\n".join(bad)


def _jax_loaded_by(modules: list[str]) -> list[str]:
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "print(' '.join(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_router_imports_no_jax():
    assert _jax_loaded_by(["jaxserve.runtime.router"]) == []


def test_planner_loads_no_jax():
    modules = [_module_name(p) for p in _files("planner") if p.name != "__main__.py"]
    assert _jax_loaded_by(modules) == []


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for pkg in PACKAGES for p in _files(pkg)}
    graph: dict[str, set[str]] = {}
    for module, p in paths.items():
        edges = graph.setdefault(module, set())
        for node in _module_level_imports(_tree(p).body):
            names = _imported(node, module, p.name == "__init__.py")
            targets = names
            if isinstance(node, ast.ImportFrom):  # the submodules it names, else the package itself
                targets = [n for n in names[1:] if n in paths] or names[:1]
            edges.update(n for n in targets if n in paths and n != module)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _import_graph()
    cycles = _cycles(graph)
    detail = ["{" + ", ".join(c) + "}: " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c)
              for c in cycles]
    assert not cycles, "module-level import cycles:\n" + "\n".join(detail)


def test_the_import_graph_sees_what_it_should():
    """The scanner itself: relative imports, submodules named by ``from pkg import``, and the skips."""
    graph = _import_graph()
    assert "jaxserve.config" in graph["planner.latency"]
    assert "jaxserve.serving.protocol" in graph["jaxserve.serving.api_server"]
    assert "jaxserve.profiling.grid" in graph["jaxserve.profiling.cli"]  # from .grid import ...
    assert "jaxserve.profiling.profile" not in graph["jaxserve.profiling.cli"]  # imported inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    src = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nelse:\n    import y\n"
                    "try:\n    import z\nexcept ImportError:\n    import w\ndef f():\n    import v\n")
    assert [a.name for n in _module_level_imports(src.body) for a in n.names] == ["TYPE_CHECKING", "y", "z", "w"]
