"""The shape of the house (docs/architecture.md, "Where things live"), checked from the source:
no import circles, adapters below the gateway, modules small enough to read.

Imports are read from the syntax tree, function-level imports included (a lazy import is still a
dependency). Imports under `if TYPE_CHECKING:` are left out: they are annotations, never run."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "adapters")
MAX_LINES = 500
# What adapters/ may use from gateway/: leaf modules that import nothing else from the gateway.
ADAPTER_MAY_IMPORT = {
    "gateway.errors",
    "gateway.durations",
    "gateway.addresses",
    "gateway.dataplane.target",
    "gateway.observability.tracing",
}


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "gen" in path.relative_to(ROOT).parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _runtime_nodes(tree: ast.AST):
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for sub in node.body for n in ast.walk(sub))
    return [n for n in ast.walk(tree) if id(n) not in skipped]


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - (node.level - 1)]
                    base = ".".join([*here, base] if base else here)
                submodules = [
                    f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules
                ]
                # `from package import module` depends on the module, not on the package's body.
                candidates = submodules or [base]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        edges[name] = targets
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
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


def test_no_import_circles():
    edges = _imports(_modules())
    assert _cycles(edges) == []


def test_the_checker_finds_a_circle():
    # The checker itself: a circle of three, and a self-contained tree beside it.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_adapters_import_only_leaf_modules_of_the_gateway():
    modules = _modules()
    edges = _imports(modules)
    reaching_up = {
        name: sorted(t for t in targets if t.startswith("gateway") and t not in ADAPTER_MAY_IMPORT)
        for name, targets in edges.items()
        if name.startswith("adapters")
    }
    assert {k: v for k, v in reaching_up.items() if v} == {}
    # ... and those leaves are leaves: they import nothing else from gateway/ or adapters/.
    for leaf in ADAPTER_MAY_IMPORT:
        assert edges[leaf] == set(), (leaf, edges[leaf])


def test_modules_stay_readable():
    too_long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert too_long == {}


def test_layers_import_the_contract_not_the_chain():
    # A layer depends on the contract (contract.py); only the chain (chain.py) knows the order.
    edges = _imports(_modules())
    layers = [
        name
        for name in edges
        if name.startswith("gateway.dataplane.layers.")
        and name.split(".")[3] not in ("chain", "contract")
    ]
    assert layers, "no layers found"
    assert [n for n in layers if "gateway.dataplane.layers.chain" in edges[n]] == []
