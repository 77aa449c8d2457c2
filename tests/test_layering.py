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
