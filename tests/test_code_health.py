"""Rules about the code itself, read with `ast`: a module's private names stay its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "idprior"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_of(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The dotted module an import names, relative imports resolved against `path`'s package."""
    if not node.level:
        return node.module or ""
    package = _module_of(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def private_uses(path: Path) -> list[str]:
    """`from idprior.x import _name` and `x._name` (x an imported idprior module) in one file, where
    x is not the file's own module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = _module_of(path) if SRC in path.parents else None
    modules: set[str] = set()  # local names bound to idprior modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, path) if SRC in path.parents else (node.module or "")
            if not source.startswith("idprior"):
                continue
            for alias in node.names:
                if _private(alias.name) and source != own:
                    found.append(f"{path.name}:{node.lineno} imports {source}.{alias.name}")
                elif not _private(alias.name):
                    modules.add(alias.asname or alias.name)  # may be a module (`from . import io`)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("idprior"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in modules):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("root", [SRC, BENCHMARKS], ids=["src", "benchmarks"])
def test_no_private_names_across_modules(root):
    """A leading underscore means "this module's own": another module (or a benchmark script) that
    needs it needs a public name, so that a refactor of one module cannot silently break another."""
    found = [use for path in sorted(root.rglob("*.py")) for use in private_uses(path)]
    assert found == []


def test_the_checker_sees_private_imports(tmp_path):
    """The rule above would pass vacuously if the checker saw nothing: it flags both forms."""
    script = tmp_path / "x.py"
    script.write_text("from idprior.pipeline.stages import _hidden\nfrom idprior import io\nio._secret(1)\n")
    assert private_uses(script) == ["x.py:1 imports idprior.pipeline.stages._hidden", "x.py:3 uses io._secret"]


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The idprior modules `path` imports, lazily (inside functions) or not."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, path)
            for alias in node.names:
                full = f"{source}.{alias.name}"
                deps.add(full if full in modules else source)
        elif isinstance(node, ast.Import):
            deps |= {alias.name for alias in node.names}
    return (deps & modules) - {_module_of(path)}


def import_cycles(root: Path = SRC) -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan), each a cycle of imports."""
    paths = {_module_of(p): p for p in root.rglob("*.py")}
    graph = {m: _imports(p, set(paths)) for m, p in paths.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return cycles


def test_no_import_cycles():
    """Modules import each other one way, lazy imports included: a cycle is a sign that a rule lives in
    the wrong module (e.g. preflight reaching into pipeline, or a task loader into the task registry:
    data/base.py <- offline/glue/custom <- tasks.py)."""
    assert import_cycles() == []


MAX_LINES = 80
LONG_REASON = "Why this is long:"  # a function may exceed MAX_LINES if its docstring says why


def long_functions(root: Path = SRC) -> list[str]:
    """Functions (methods included) over MAX_LINES lines whose docstring gives no reason."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_functions_are_short():
    """A function over ~80 lines hides several steps: extract them (complexity > 15 is ruff's C901,
    configured in pyproject.toml)."""
    assert long_functions() == []


def script_coupling(path: Path, scripts: set[str]) -> list[str]:
    """Imports of another script of `scripts` (module names) and any use of `sys.path` in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if not node.level else [node.module or "", *(a.name for a in node.names)]
        else:
            names = []
        found += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in scripts]
        if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys"):
            found.append(f"{path.name}:{node.lineno} uses sys.path")
    return sorted(found, key=lambda f: int(f.split(":")[1].split()[0]))


def test_benchmark_scripts_import_only_the_package():
    """A helper two scripts share belongs in idprior (idprior.study.benchutil), not in a script the other
    imports: a script found through sys.path (or the script's own folder) breaks when it moves,
    runs from another directory or is installed, and its helpers escape the tests and the lint."""
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")}
    assert [use for path in sorted(BENCHMARKS.glob("*.py")) for use in script_coupling(path, scripts)] == []


def test_the_checker_sees_script_coupling(tmp_path):
    (tmp_path / "helper.py").write_text("X = 1\n")
    script = tmp_path / "main.py"
    script.write_text("import sys\nsys.path.insert(0, '.')\nimport helper\nfrom helper import X\n"
                      "from . import helper as h\nfrom idprior import io\n")
    assert script_coupling(script, {"helper", "main"}) == [
        "main.py:2 uses sys.path", "main.py:3 imports helper", "main.py:4 imports helper", "main.py:5 imports helper"]
