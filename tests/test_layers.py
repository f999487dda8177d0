"""The package's layers, read from its imports: the engine never imports the lm-eval side, the
upstream internals (``upstream``) import nothing of the package, and no module imports another that
(directly or not) imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lm_eval_parathinker"

#: each layer and the package modules it may import (besides its own)
ALLOWED = {
    "upstream": set(),
    "engine": {"protocol", "formats", "upstream", "files", "tables"},
    "harness": {"engine", "protocol", "formats", "scoring", "embedded", "files", "checkpoint", "thought_embedding", "upstream"},
    # results files: read runs' outputs, never run a model
    "leaderboard": {"stats", "data", "tables", "plotting", "files"},
    "tables": {"files"},
    "plotting": {"files"},
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (absolute names)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lm_eval_parathinker")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            elif (node.module or "").startswith("lm_eval_parathinker"):
                target = node.module
            else:
                continue
            if node.module:  # `from .. import x` imports x, not the package's own code
                found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}  # `from . import x`: module x
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_no_import_runs_back_up_a_layer():
    bad = []
    for module, imported in _graph().items():
        layer = _layer(module)
        if layer not in ALLOWED:
            continue
        for target in imported:
            if _layer(target) != layer and _layer(target) not in ALLOWED[layer]:
                bad.append(f"{module} imports {target}")
    assert not bad, bad


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ importing its own modules is not a cycle of the code
    graph = {m: {t for t in ts if not (m.startswith(t + ".") or t.startswith(m + "."))} for m, ts in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_graph_is_read():
    """The checks above see the imports (a broken reader would pass them vacuously)."""
    graph = _graph()
    assert "lm_eval_parathinker.engine.options" in graph["lm_eval_parathinker.harness.options"]
    assert "lm_eval_parathinker.protocol" in graph["lm_eval_parathinker.engine.generate"]
    assert "lm_eval_parathinker.harness.requests" in graph["lm_eval_parathinker.harness.model"]
    assert "lm_eval_parathinker.upstream.torch" in graph["lm_eval_parathinker.engine.attention"]
    assert "lm_eval_parathinker.tables" in graph["lm_eval_parathinker.leaderboard.rows"]
