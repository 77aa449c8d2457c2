"""Build petal_fast: the Python package, `kernels/` installed as `petal_fast.kernels`, the C++ sources
`csrc/` shipped as `petal_fast/csrc` (package data: the just-in-time build compiles them), and, when
torch is importable at build time, the ahead-of-time extension `petal_fast._C` compiled from every
`csrc/*.cpp` with torch's BuildExtension.

An isolated build (`pip install .`, `pip wheel .`, `python -m build`) has no torch: it installs the
package without `_C`, and the ops are compiled against the running torch at first use instead
(petal_fast/_ext.py, docs/design.md §3.2). So does a failed AOT build (no compiler).
"""
import glob
import importlib.util
import json
import os
import warnings
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("_petal_fast_build", HERE / "petal_fast" / "_build.py")
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)  # torch-free: flags shared with the just-in-time build

packages = ["petal_fast", "petal_fast.kernels", "petal_fast.csrc"] + [
    "petal_fast." + d for d in ("ops", "ops.petal_linear", "ops.margin_loss", "ops.brisque", "reference", "nn", "quality",
                               "models", "data", "eval", "training", "definitions", "demo")
]
package_dir = {"petal_fast": "petal_fast", "petal_fast.kernels": "kernels", "petal_fast.csrc": "csrc"}
package_data = {"petal_fast.csrc": ["*.cpp", "*.h"]}

ext_modules, cmdclass = [], {}
if os.environ.get("PETAL_FAST_NO_EXT") != "1":
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("petal_fast: torch is not importable at build time (an isolated build): no ahead-of-time "
              "extension; the C++ ops are compiled against the running torch at first use")
    else:
        sources = sorted(glob.glob("csrc/*.cpp"))
        ext_modules = [CppExtension("petal_fast._C", sources, extra_compile_args=_build.cxx_flags(),
                                    extra_link_args=_build.ld_flags())]

        class LenientBuild(BuildExtension):
            """Build the extension and record the torch it was built for (`_C.json` beside it, read
            before importing it); on failure (no compiler) warn and install without it."""

            def run(self):
                try:
                    super().run()
                except Exception as err:  # noqa: BLE001 - any toolchain failure means "no extension"
                    warnings.warn(f"petal_fast C++ extension not built ({err}); the ops are compiled at "
                                  "first use if a compiler is found then, else the torch fallback runs")
                    return
                for ext in self.extensions:
                    sidecar = Path(self.get_ext_fullpath(ext.name)).with_name("_C.json")
                    compiler = _build.compiler()
                    sidecar.write_text(json.dumps({"torch": torch.__version__,
                                                   "compiler": compiler[1] if compiler else None}))

        cmdclass = {"build_ext": LenientBuild.with_options(use_ninja=True)}

setup(packages=packages, package_dir=package_dir, package_data=package_data, ext_modules=ext_modules,
      cmdclass=cmdclass)
