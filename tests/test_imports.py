"""The package's imports run one way (docs/design.md): no cycles, counting imports inside functions, and the core
modules below the public helpers, the trainer integration, the command line and the analysis."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peft_infosteer"

# lower layers first: a module may import only modules of its own or an earlier layer
LAYERS: list[set[str]] = [
    {"version", "_env", "_native", "_compat", "_closed_form", "_elevate", "ops"},
    {"regularizer", "target", "architectures", "_registration", "validation"},
    {"config"},
    {"layer"},
    {"model", "state", "hub"},
    {"loss", "checkpoints", "assets"},
    {"trainer", "cli", "commands", "analysis", "__init__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules imported anywhere in ``path`` (module level or inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found |= {t for t in targets if t in modules and t != name and t != "peft_infosteer"}
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _layer_of(module: str) -> int:
    short = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, layer in enumerate(LAYERS) if short in layer)


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles among package modules: {cycles}"


def test_imports_run_from_the_core_up():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _layer_of(target) > _layer_of(module)
    ]
    assert not upward, f"modules importing a higher layer: {upward}"


def test_every_module_has_a_layer():
    for module in _graph():
        assert _layer_of(module) >= 0


def test_the_checker_finds_a_cycle(tmp_path, monkeypatch):
    # the test above can fail: two modules that import each other inside functions are a cycle
    package = tmp_path / "peft_infosteer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ops.py").write_text("def f():\n    from .config import X\n")
    (package / "config.py").write_text("def g():\n    from . import ops\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match=r"ops -> peft_infosteer\.config"):
        test_imports_run_from_the_core_up()


def test_importing_the_package_does_not_import_the_trainer():
    code = "import sys, peft_infosteer; print('transformers.trainer' in sys.modules, 'trl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
