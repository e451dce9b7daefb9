"""The import structure of appliance/ and replay/ (docs/architecture.md, "Layers"): no import cycles
between modules or between components, and every component imports only its own layer or those
below it.

The graph is read from the source files with `ast`, not from a running interpreter, and every
import counts wherever it is written: at the top, inside a function (lazy) or under
`if TYPE_CHECKING:`. A lazy or type-only import hides a cycle from Python, not from the reader.
A *component* is a package directly under appliance/ or replay/ (`appliance.audit`,
`replay.compat`) or a module directly under them (`appliance.app`, `replay.cli`).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("appliance", "replay")

# Lowest first. A component may import components of its own layer (the graph between them stays
# acyclic) and of every layer below; never one above.
LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    # Imports nothing of the appliance, or only other foundation modules.
    ("foundation", frozenset({
        "appliance.names", "appliance.credentials", "appliance.yamlsource", "appliance.children",
        "appliance.logs", "appliance.sdnotify", "appliance.mqtt", "appliance.msglog",
    })),
    # The typed config: pydantic and yaml plus the foundation, no runtime code.
    ("config", frozenset({"appliance.config"})),
    # What flows through the pipeline, and the state dir's lock.
    ("model", frozenset({"appliance.pipeline", "appliance.statedir", "appliance.republish"})),
    # The checks: schema governance, authentication and ACLs, TLS files.
    ("checks", frozenset({"appliance.governance", "appliance.security"})),
    # The running parts, each usable on its own.
    ("components", frozenset({
        "appliance.audit", "appliance.forward", "appliance.broker", "appliance.proxy",
        "appliance.metrics", "appliance.admin", "appliance.reload", "appliance.deadletter",
    })),
    # Wires the components into one service.
    ("service", frozenset({"appliance.app", "appliance.preflight"})),
    # Command lines and tools, which may use anything below; replay is one of them.
    ("tools", frozenset({
        "appliance.__main__", "appliance.cli", "appliance.cli_audit", "appliance.console", "appliance.simulate",
        "appliance.simulate_formats",
        "replay.capture", "replay.cli", "replay.compat", "replay.engine", "replay.errors",
        "replay.infer", "replay.judge", "replay.render", "replay.report", "replay.rows", "replay.sources",
        "replay.static", "replay.tally",
    })),
)
LAYER_OF = {component: index for index, (_, members) in enumerate(LAYERS) for component in members}


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Every module of the two packages: dotted name -> (file, is a package's __init__)."""
    found = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of the two packages it imports (anywhere in its source)."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for module, (path, is_package) in mods.items():
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from package import module` imports that module; `from module import name` the module.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base for alias in node.names]
            for target in targets:
                resolved = resolve(target)
                if resolved is not None and resolved != module:
                    graph[module].add(resolved)
    return graph


def component(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def component_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    result: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph.items():
        for target in targets:
            if component(module) != component(target):
                result[component(module)].add(component(target))
    return result


def _explain(graph: dict[str, set[str]], members: list[str]) -> str:
    inside = set(members)
    return "; ".join(f"{a} -> {b}" for a in members for b in sorted(graph.get(a, set()) & inside))


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert not (found := cycles(graph)), [_explain(graph, members) for members in found]


def test_no_import_cycle_between_components():
    graph = component_graph(import_graph())
    assert not (found := cycles(graph)), [_explain(graph, members) for members in found]


def test_every_component_has_a_layer():
    components = {component(module) for module in modules() if module not in PACKAGES}
    assert not (components - set(LAYER_OF)), f"add these to LAYERS (and docs/architecture.md): {sorted(components - set(LAYER_OF))}"
    assert not (set(LAYER_OF) - components), f"no longer exist: {sorted(set(LAYER_OF) - components)}"


def test_components_import_only_their_layer_or_below():
    upward = sorted(
        f"{source} ({LAYERS[LAYER_OF[source]][0]}) -> {target} ({LAYERS[LAYER_OF[target]][0]})"
        for source, targets in component_graph(import_graph()).items() if source in LAYER_OF
        for target in targets if target in LAYER_OF and LAYER_OF[target] > LAYER_OF[source]
    )
    assert not upward, upward


def test_the_checker_sees_lazy_and_type_only_imports(tmp_path):
    """A cycle made of a function-level import one way and a TYPE_CHECKING import the other is found,
    as are relative imports and `from package import module`."""
    package = tmp_path / "appliance"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import inner\n")
    (package / "sub" / "inner.py").write_text("def f():\n    from ..app import run\n")
    (package / "app.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from appliance.sub import inner\n")
    (package / "leaf.py").write_text("import os\n")
    graph = import_graph(tmp_path)
    assert graph["appliance.sub.inner"] == {"appliance.app"} and graph["appliance.app"] == {"appliance.sub.inner"}
    assert graph["appliance.sub"] == {"appliance.sub.inner"}
    assert cycles(graph) == [["appliance.app", "appliance.sub.inner"]]
    assert cycles(component_graph(graph)) == [["appliance.app", "appliance.sub"]]


def test_layers_are_documented():
    text = (ROOT / "docs" / "architecture.md").read_text()
    for name, members in LAYERS:
        assert f"| {name} |" in text, name
        for member in members:
            if member.startswith("appliance."):
                assert f"`{member.removeprefix('appliance.')}`" in text or f"`{member}`" in text, member
