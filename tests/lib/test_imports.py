"""The package's structure: no import cycle, no private name across modules, lazy surfaces.

The graph is read from the source (``ast``), function-local imports included, so a cycle
held open by an import inside a function fails here as well as one at module level.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "galorax"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "conftest.py"}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, type_only: bool = False) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, nested ones included; under ``if TYPE_CHECKING:`` only with
    ``type_only``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_only:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(module: str, type_only: bool = False) -> set[str]:
    """The galorax modules that ``module`` imports (type-only imports too with ``type_only``)."""
    tree = ast.parse(MODULES[module].read_text())
    out: set[str] = set()
    for node in _imports(tree, type_only):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            source = _resolve(module, node)
            # ``from galorax import sharding`` names a module; ``from galorax import galore``
            # a name of the package's __init__.
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source
                for a in node.names
            ]
        out.update(t for t in targets if t in MODULES and t != module)
    return out


def _cycle() -> list[str] | None:
    graph = {m: _edges(m, type_only=True) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_module_graph_is_read():
    assert "galorax.transform" in _edges("galorax.accounting")
    assert "galorax.sharding" in _edges("galorax.app.distributed")


def test_no_import_cycle_among_galorax_modules():
    """Type-only imports (``if TYPE_CHECKING:``) included."""
    cycle = _cycle()
    assert cycle is None, " -> ".join(cycle or [])


def test_the_library_never_imports_the_application():
    """No module of ``galorax/`` outside ``galorax/app`` imports (or lazily exports) a
    module of the application, type-only imports included."""
    # galorax/__main__.py is ``python -m galorax``: the command line's entry, not the library.
    library = [m for m in MODULES if not m.startswith("galorax.app") and m != "galorax.__main__"]
    bad = {
        m: sorted(e)
        for m in library
        if (e := {n for n in _edges(m, True) if n.startswith("galorax.app")})
    }
    lazy = [m for m in library if "galorax.app." in MODULES[m].read_text().split('"""', 2)[-1]]
    assert not bad and not lazy, (bad, lazy)


def _private_uses(module: str) -> list[str]:
    """``from galorax.x import _y`` and ``alias._y`` on an imported galorax module."""
    tree = ast.parse(MODULES[module].read_text())
    bad: list[str] = []
    aliases: set[str] = set()
    for node in _imports(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, node)
            for a in node.names:
                if f"{source}.{a.name}" in MODULES:
                    aliases.add(a.asname or a.name)
                elif source in MODULES and a.name.startswith("_") and not a.name.startswith("__"):
                    bad.append(f"{module}: from {source} import {a.name}")
        else:
            for a in node.names:
                if a.name in MODULES and a.asname:
                    aliases.add(a.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            bad.append(f"{module}: {node.value.id}.{node.attr}")
    return bad


def test_no_private_name_used_across_modules():
    bad = [b for m in MODULES for b in _private_uses(m)]
    assert not bad, "\n".join(bad)


def _fresh(code: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


LOADED = "print(sorted({m.split('.')[0] if m.startswith('jax') else m for m in sys.modules "
LOADED += "if m.startswith(('jax', 'galorax.app'))}))"


def test_import_galorax_loads_neither_jax_nor_the_application():
    assert _fresh(f"import sys, galorax\n{LOADED}") == "[]"


def test_the_library_surface_leaves_the_cli_unimported():
    code = "import sys, galorax\n"
    code += "galorax.galore(0.1); galorax.quantization.quantize_blockwise; galorax.plan_memory\n"
    code += "print('galorax.app.cli' in sys.modules, 'argparse' in sys.modules)"
    assert _fresh(code).split()[0] == "False"


def test_import_galorax_torch_leaves_jax_unimported():
    pytest.importorskip("torch")
    assert _fresh(f"import sys, galorax.torch\n{LOADED}") == "[]"


@pytest.mark.parametrize("name", ["galore", "scale_by_galore", "GaLoreState", "plan_memory"])
def test_lazy_names_are_the_objects_not_modules(name):
    import galorax

    assert callable(getattr(galorax, name))
    assert name in dir(galorax) and name in galorax.__all__


MATH = ("galorax.galore_math", "galorax.apollo_math", "galorax.subspace")


@pytest.mark.parametrize("module", MATH)
def test_the_per_leaf_math_imports_no_execution_module(module):
    """The math (pure functions of dense arrays) reaches only math and settings modules:
    no chunking, placement, storage or gate, type-only imports included."""
    allowed = {*MATH, "galorax.residual"}  # Residual: the compensation's settings
    seen, todo = set(), [module]
    while todo:
        for n in _edges(todo.pop(), type_only=True) - seen:
            seen.add(n)
            todo.append(n)
    assert seen <= allowed, sorted(seen - allowed)
