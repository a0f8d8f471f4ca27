"""The shape of the house: no import cycle in the package (function-local imports count too), the pipeline's three
modules in one direction, the kernels on their own, and no function in w2s/ (its kernels aside) longer than a reader
can hold.

    python -m pytest -q tests/test_architecture.py
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("w2s",)
MAX_FUNCTION_LINES = 80


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules():
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path, modules):
    """The package modules a file imports anywhere in it (top level or inside a function), by module name."""
    found = set()
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: "." is this package, ".." its parent
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one, else a name of pkg
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules and name != this}
    return found


def _graph():
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _cycle(graph):
    """One import cycle as a list of module names, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_function_local_imports():
    graph = _graph()
    assert "w2s.model" in graph["w2s.checkpoint"] and "w2s.pipeline" in graph["w2s.cli"]  # cli imports inside commands


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_pipeline_table_runners_engine_in_one_direction():
    graph = _graph()
    assert {"w2s.runners", "w2s.engine"} <= graph["w2s.pipeline"]
    assert "w2s.pipeline" not in graph["w2s.runners"]
    assert not {"w2s.pipeline", "w2s.runners"} & graph["w2s.engine"]


def test_the_kernels_import_nothing_else_of_the_package():
    """w2s/kernels/ stands alone (plain PyTorch and Triton): w2s/ops.py chooses between its modules, never the other
    way round, so a kernel can be read, tested and benchmarked by itself."""
    graph = _graph()
    kernels = [m for m in graph if m.startswith("w2s.kernels")]
    assert len(kernels) > 10
    assert {m: sorted(d for d in graph[m] if not d.startswith("w2s.kernels")) for m in kernels} == \
        {m: [] for m in kernels}
    assert "w2s.kernels.reference" in graph["w2s.ops"]


def test_no_long_functions_in_the_package():
    """w2s/kernels/ aside: a Triton kernel is one program per tile, read whole beside the reference it computes."""
    long = []
    for path in sorted(p for p in (ROOT / "w2s").rglob("*.py") if "kernels" not in p.relative_to(ROOT).parts):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
