"""The package's shape (issue 13): no import cycles (function-level imports included), no module
importing from a layer above it, nothing outside the pipeline touching the generator's internals,
no source file over 600 lines, and no function of the generation core taking more than 6 parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "sfumato"
# lowest first; a module may import from its own layer and the ones below
LAYERS = [
    ("sfumato.errors", "sfumato.version", "sfumato.safe_image", "sfumato.data"),
    ("sfumato.models", "sfumato.diffusion"),
    ("sfumato.checkpoint",),
    ("sfumato.text", "sfumato.adapters", "sfumato.backends"),
    ("sfumato.pipeline",),
    ("sfumato.api", "sfumato"),
]
CORE = ("plan", "run", "engine", "guidance", "generate", "patches", "control")


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:`` (never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    return skip


def imports(name: str) -> set[str]:
    """The sfumato modules ``name`` imports anywhere in its source (functions included)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sfumato"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "sfumato":
                base = node.module
            else:
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def _layer(name: str) -> int:
    """The layer of a module (front ends — server, commands, batch, train, bench — above all of them)."""
    for i, prefixes in enumerate(LAYERS):
        if name in prefixes or any(name.startswith(p + ".") for p in prefixes if p != "sfumato"):
            return i
    return len(LAYERS)


def test_the_graph_sees_function_level_imports():
    assert "sfumato.api" in GRAPH["sfumato"]                  # sfumato.load imports it inside the function
    assert "sfumato.pipeline.plan" in GRAPH["sfumato.pipeline.generate"]


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles


def test_no_module_imports_from_a_layer_above_it():
    upward = [(m, d) for m, deps in GRAPH.items() for d in deps if _layer(d) > _layer(m)]
    assert not upward


def test_nothing_outside_the_pipeline_touches_the_generators_internals():
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("sfumato.pipeline") or name == "sfumato.api":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and "pipeline" in (node.module or ""):
                offenders += [(name, a.name) for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                    node.value.attr == "generator":
                offenders.append((name, f"….generator.{node.attr}"))
    assert not offenders


def test_no_source_file_is_over_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long


@pytest.mark.parametrize("module", CORE)
def test_generation_core_functions_take_at_most_6_parameters(module):
    tree = ast.parse(MODULES[f"sfumato.pipeline.{module}"].read_text())
    wide = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            names += [x.arg for x in (a.vararg, a.kwarg) if x is not None]
            if len(names) > 6:
                wide.append((node.name, len(names)))
    assert not wide
