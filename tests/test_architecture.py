"""The layers of the package, checked on its source: a lower layer never imports a higher one
(not even inside a function), and no module imports itself back through others."""

import ast
from pathlib import Path

from conftest import REPO

# Lowest first. A module may import its own layer and those before it.
LAYERS = [
    ("errors", "logs", "files", "run_state", "processes"),  # shared helpers: error lines, logging, atomic writes, run.json, work split between processes
    ("config",),
    ("data",),
    ("policy",),
    ("wrapper",),  # the deployment wrapper: a checkpoint and a policy, nothing of training
    ("envs",),
    ("evaluation",),
    ("strategies",),
    ("training",),
    ("benchmark",),
    ("cli", "train_smolvla_sequential"),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
PACKAGE = REPO / "kuavo_train"


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every kuavo_train module each module imports, wherever the import statement is."""
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        out[name] = found
    return out


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_every_module_has_a_layer():
    assert {_layer(m) for m in _imports() if m != "kuavo_train"} <= set(RANK)


def test_lower_layers_never_import_higher_ones():
    bad = sorted(f"{m} -> {t}" for m, ts in _imports().items() if m != "kuavo_train" for t in ts
                 if RANK[_layer(t)] > RANK[_layer(m)])
    assert not bad, bad


def test_no_import_cycles():
    graph = _imports()
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
