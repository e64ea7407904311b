"""The shape of the code base, checked from its source (no import is executed).

- No import circle: between modules (imports inside functions count: a lazy import that
  closes a loop is still a loop), and between the rooms of ``moe`` (each top-level module
  or subpackage: moe.data, moe.train, moe.parallel, moe.runs, moe.scaling, ...).
- No private name (``_x``) imported from another module.
- No function in moe/ or kernels/ longer than 100 lines (Triton kernels excepted).
- Comments and docstrings cite documents that a clone has (docs/), not ../shared.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moe", "kernels")
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path):
    """(target module, imported names, line) for every import in ``path`` that names a
    module of this project: ``from pkg import mod`` targets ``pkg.mod``."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            if base not in MODULES:
                continue
            plain = []
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:
                    yield f"{base}.{a.name}", [], node.lineno
                else:
                    plain.append(a.name)
            if plain:
                yield base, plain, node.lineno


def _graph(node_of) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        src = node_of(name)
        if src is None:
            continue
        g.setdefault(src, set())
        for target, _, _ in _imports(name, path):
            dst = node_of(target)
            if dst is not None and dst != src:
                g[src].add(dst)
    return g


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    # a package's __init__ that only hands names on is still a module here: importing
    # ``moe.scaling`` runs it, so a submodule importing its own package's face counts
    assert _cycles(_graph(lambda m: m)) == []


def _room(m: str):
    """moe.X for moe's top-level modules and subpackages; kernels as one room; the face
    ``moe/__init__.py`` (re-exports only) is no room."""
    parts = m.split(".")
    if parts[0] == "kernels":
        return "kernels"
    return None if m == "moe" else ".".join(parts[:2])


def test_no_import_cycle_between_rooms():
    assert _cycles(_graph(_room)) == []


def test_no_private_name_imported_across_modules():
    bad = []
    for name, path in MODULES.items():
        for target, names, line in _imports(name, path):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {n} from {target}")
    assert bad == []


def _is_triton_kernel(fn: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in fn.decorator_list)


def test_no_long_function():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_kernel(node):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_citations_stay_inside_the_repo():
    pattern = re.compile(r"\.\./shared|shared/SPEC|(?<![\w/])(SPEC|ANCHORS|STYLE)\.md")
    bad = []
    for path in [*MODULES.values(), *sorted((ROOT / "benchmarks").rglob("*.py")),
                 *sorted((ROOT / "configs").rglob("*.yaml"))]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert bad == []
