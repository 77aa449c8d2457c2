"""The package from a plain source checkout, with nothing installed (as on a GPU host that runs
``python3 -m pytest -m gpu`` with its own torch): ``petal_fast.kernels`` is the repository's ``kernels/``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_kernels_subpackage_from_a_source_checkout():
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in repr(f)]  # as if not installed\n"
            "import petal_fast, petal_fast.kernels.petal_linear as k\n"
            "print(petal_fast.__file__); print(k.__file__)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    package, kernels = out.stdout.split()
    assert Path(package) == REPO / "petal_fast" / "__init__.py"
    assert Path(kernels) == REPO / "kernels" / "petal_linear.py"


def test_top_level_kernels_does_not_shadow_the_pypi_package():
    """``kernels/`` is installed as ``petal_fast.kernels`` only: from the repository root, ``import kernels``
    (transformers imports the PyPI package of that name) must not find our directory as a regular package."""
    assert not (REPO / "kernels" / "__init__.py").exists()
    code = ("import importlib.util as u\n"
            "s = u.find_spec('kernels')\n"
            "print(s.origin if s and s.origin else 'namespace' if s else 'none')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    origin = out.stdout.strip()
    assert not origin.startswith(str(REPO / "kernels")), origin
    # the third-party import that failed with the shadowing package
    out = subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_setup_lists_every_subpackage():
    """setup.py names its packages one by one: a subpackage missing there (an op's package) would be
    left out of every wheel, and the installed petal_fast would fail at import."""
    namespace: dict = {}
    source = (REPO / "setup.py").read_text()
    exec(source[source.index("packages = ["):source.index("package_dir =")], namespace)  # the list alone
    listed = set(namespace["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "petal_fast").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
