"""Layering (docs/design.md §2), read from the sources' import statements, function-level ones included:
the layers below import nothing of the layers above, there is no import cycle, kernels/ and the oracle
import nothing of petal_fast but the shared definitions, and settings are read from below (settings.py
imports no layer that uses them)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the op dispatchers offer the oracle as the user-selectable ``reference`` backend
DISPATCHERS = {"petal_fast/ops/margin_loss/dispatch.py", "petal_fast/ops/petal_linear/dispatch.py",
               "petal_fast/ops/brisque/dispatch.py"}
# The layers, lowest first: a module imports modules of its own layer or of layers below it. A name
# stands for the module and everything under it ("petal_fast" alone: the package's __init__).
LAYERS = (
    ("definitions", ("petal_fast.definitions",)),
    ("base", ("petal_fast._openmp_env", "petal_fast.threads", "petal_fast.settings", "petal_fast._build",
              "petal_fast._ext", "petal_fast.backend", "petal_fast.progress", "petal_fast.atomic_files",
              "petal_fast.io_guard", "petal_fast.jsonio", "petal_fast.memory")),
    ("kernels and the oracle", ("petal_fast.kernels", "petal_fast.reference")),
    ("ops", ("petal_fast.ops",)),
    ("modules", ("petal_fast.nn", "petal_fast.quality", "petal_fast.cpu_tuning", "petal_fast.data")),
    ("models", ("petal_fast.models", "petal_fast.eval")),
    ("training", ("petal_fast.config", "petal_fast.training", "petal_fast.train", "petal_fast.user_errors",
                  "petal_fast.export", "petal_fast.demo")),
    ("package", ("petal_fast",)),
    ("commands", ("petal_fast.cli", "petal_fast.info")),
)


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
    assert importers <= DISPATCHERS, sorted(importers - DISPATCHERS)


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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(["petal_fast", *parts] if parts[0] == "kernels" else parts).removesuffix(".__init__")


def _bound_names(path: Path) -> set[str]:
    """The names a package's ``__init__`` binds at module level (what ``from package import name`` can find there)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def _graph() -> dict[str, set[str]]:
    """module → the modules of petal_fast it imports, at module level or inside functions.

    ``from package import submodule`` depends on the submodule, ``from module import name`` on the
    module; ``from package import name`` of a name the package's ``__init__`` does not bind (a compiled
    extension such as ``petal_fast._C``) depends on nothing here."""
    modules = {_module_name(p): p for p in _sources()}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                for a in node.names:
                    if f"{base}.{a.name}" in modules:
                        deps.add(f"{base}.{a.name}")
                    elif base in modules and (modules[base].name != "__init__.py"
                                              or a.name in _bound_names(modules[base])):
                        deps.add(base)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def _layer(module: str) -> int | None:
    found = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
             if module == prefix or (prefix != "petal_fast" and module.startswith(prefix + "."))]
    return max(found)[1] if found else None


def test_every_module_has_a_layer():
    assert [m for m in _graph() if _layer(m) is None] == []


def test_no_upward_imports():
    """kernels ← ops ← nn ← models ← train (docs/design.md §2): nothing imports a layer above its own."""
    upward = sorted(f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
                    for m, deps in _graph().items() for d in deps
                    if _layer(m) is not None and _layer(d) is not None and _layer(d) > _layer(m))
    assert upward == []


def test_no_import_cycles():
    """No cycle in the import graph, function-level imports included: a lower module that needs an upper
    one at run time gets it as an argument or from a table the upper layer reads, not by importing it."""
    graph = _graph()
    cycles = set()
    for start in graph:  # every cycle through ``start``, by a DFS from it
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    cycles.add(frozenset(trail))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
    assert cycles == set(), sorted(map(sorted, cycles))


def test_settings_are_read_from_below():
    """settings.py pushes nothing down: it imports no module that reads a setting (the kernels, the
    compiled-ops loader, the ops), only the shared definitions and the thread-pool sizing it applies."""
    ours = _graph()["petal_fast.settings"]
    assert all(n.startswith("petal_fast.definitions") or n == "petal_fast.threads" for n in ours), sorted(ours)


def test_ops_find_their_backends_by_plain_imports():
    """Each op's backends are a table of plain imports (ops/<op>/backends.py), so ops → kernels is
    visible to readers and tools: no importlib, no __import__ in the ops or the kernels."""
    dynamic = []
    for path in sorted((ROOT / "petal_fast" / "ops").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.func.attr if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else (
                node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None)
            if name in ("import_module", "__import__"):
                dynamic.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert dynamic == []
