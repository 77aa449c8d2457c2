"""The oracle stays independent: only the op dispatchers import ``petal_fast.reference``, and the
reference imports nothing of petal_fast but the shared definitions."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the op dispatchers offer the oracle as the user-selectable ``reference`` backend
DISPATCHERS = {"petal_fast/ops/margin_loss.py", "petal_fast/ops/petal_linear.py", "petal_fast/ops/brisque.py"}
# still calling into the oracle; each is to move to petal_fast.definitions / petal_fast.margin_math
# or behind an op dispatcher, and to leave this list (which may only shrink)
PENDING: set[str] = set()


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    parts = list(path.relative_to(ROOT).parts[:-1])
    package = ".".join(["petal_fast", *parts] if parts[0] == "kernels" else parts)  # kernels/ installs as petal_fast.kernels
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def _sources() -> list[Path]:
    return sorted((ROOT / "petal_fast").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def test_only_op_dispatchers_import_the_oracle():
    importers = {str(p.relative_to(ROOT)) for p in _sources()
                 if not p.is_relative_to(ROOT / "petal_fast" / "reference")
                 and any(n == "petal_fast.reference" or n.startswith("petal_fast.reference.") for n in _imports(p))}
    assert importers <= DISPATCHERS | PENDING, sorted(importers - DISPATCHERS - PENDING)


def test_reference_imports_only_torch_and_the_definitions():
    for path in sorted((ROOT / "petal_fast" / "reference").glob("*.py")):
        ours = {n for n in _imports(path) if n.startswith("petal_fast")}
        assert all(n.startswith(("petal_fast.reference", "petal_fast.definitions")) for n in ours), (path.name, ours)


def test_models_do_not_read_the_backend():
    """Models choose their behaviour explicitly (e.g. ``attention_impl``); the backend switch is the ops'."""
    readers = [p.name for p in sorted((ROOT / "petal_fast" / "models").glob("*.py"))
               if "petal_fast.backend" in _imports(p) or "requested_backend" in p.read_text()]
    assert readers == []


def test_kernels_import_only_the_shared_definitions():
    """kernels/ sits below petal_fast (docs/design.md §2): it imports nothing of petal_fast but the
    shared definitions, at module level or inside functions."""
    offenders = {}
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        ours = {n for n in _imports(path) if n.startswith("petal_fast") and not n.startswith("petal_fast.kernels")}
        bad = {n for n in ours if not n.startswith("petal_fast.definitions")}
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}


def test_no_import_cycles_among_module_level_imports():
    """The module-level import graph of petal_fast (kernels included) has no cycle other than the listed
    ones, which may only shrink (function-level imports are how a lower layer reaches a plugin)."""
    known = {frozenset({"petal_fast._ext", "petal_fast.settings"})}  # settings pushes the C++ knobs at change
    modules = {}
    for path in _sources():
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        name = ".".join(["petal_fast", *parts] if parts[0] == "kernels" else parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
        deps = set()
        for node in ast.walk(top):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                # `from package import submodule` depends on the submodule; `from module import name` on the module
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    cycles = set()
    for start in graph:  # two-module cycles and longer ones through a DFS from each module
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.add(frozenset(trail))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    assert cycles <= known, sorted(map(sorted, cycles - known))
