"""The package boundaries of ARCHITECTURE.md, checked: no import cycles, no upward imports.

Imports are read with ``ast`` from every module of ``modelmesh/`` (generated
stubs excluded): top-level ones, ones inside functions, and ones under
``TYPE_CHECKING``. ``from pkg import name`` counts as an import of the module
``pkg.name`` where that is a module, else of ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "modelmesh"

#: ARCHITECTURE.md's layer order, top first: a module may import its own layer
#: (without cycles) or any layer below, never one above. A module belongs to the
#: layer of the longest prefix that names it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("modelmesh.cli", "modelmesh.__main__"),
    ("modelmesh.instance",),
    ("modelmesh.api", "modelmesh.rest", "modelmesh.runtime_server"),  # transports
    ("modelmesh.api.status",),
    ("modelmesh.routing",),
    ("modelmesh.scaling",),
    ("modelmesh.lifecycle",),
    ("modelmesh.view",),
    ("modelmesh.membership",),
    ("modelmesh.dataplane",),
    ("modelmesh.cache", "modelmesh.batching"),
    ("modelmesh.runtimes",),
    ("modelmesh.storage",),
    ("modelmesh.registry",),
    ("modelmesh.codec", "modelmesh.wire"),
    ("modelmesh.settings", "modelmesh.errors", "modelmesh.metrics", "modelmesh.tensor",
     "modelmesh.units", "modelmesh.node", "modelmesh.headers", "modelmesh.demo",
     "modelmesh.security",
     "modelmesh._proto", "modelmesh"),
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))
            if "_proto" not in p.parts or p.name == "__init__.py"}


MODULES = _modules()


def _resolve(base: str, name: str) -> str:
    candidate = f"{base}.{name}"
    return candidate if candidate in MODULES else base


def imports_of(module: str) -> set[str]:
    """The modelmesh modules ``module`` imports, wherever in the file."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "modelmesh")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "modelmesh":
                continue
            for alias in node.names:
                out.add(_resolve(base, alias.name))
    out = {m if m in MODULES else _known_prefix(m) for m in out}
    out.discard(module)
    return out


def _known_prefix(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and ARCHITECTURE.md"
    return best


GRAPH = {m: imports_of(m) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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


def test_no_module_takes_part_in_an_import_cycle() -> None:
    assert _cycles(GRAPH) == []


def test_no_module_imports_a_higher_layer() -> None:
    upward = sorted(
        f"{m} (layer {layer_of(m)}) imports {dep} (layer {layer_of(dep)})"
        for m, deps in GRAPH.items() for dep in deps if layer_of(dep) < layer_of(m)
    )
    assert upward == []


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_the_errors_know_no_transport() -> None:
    tree = ast.parse((ROOT / "errors.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
             for a in n.names} | {n.module for n in ast.walk(tree)
                                  if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(name.split(".")[0] == "grpc" for name in names)


def test_the_checker_sees_cycles_and_upward_imports() -> None:
    """The checks above can fail: a made-up graph with a cycle and an upward edge."""
    graph = {"modelmesh.view": {"modelmesh.routing.router"},
             "modelmesh.routing.router": {"modelmesh.view"}}
    assert _cycles(graph) == [["modelmesh.routing.router", "modelmesh.view"]]
    assert layer_of("modelmesh.routing.router") < layer_of("modelmesh.view")


@pytest.mark.parametrize("path", sorted(p for p in ROOT.rglob("*.py") if "_proto" not in p.parts),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_hand_written_module_is_over_500_lines(path: Path) -> None:
    if path.name == "codec.py":  # the V2 datatype table reads best in one place
        return
    assert len(path.read_text().splitlines()) <= 500
