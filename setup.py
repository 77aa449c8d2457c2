"""Build petal_fast: the Python package, `kernels/` installed as `petal_fast.kernels`, and the
C++ CPU backend `petal_fast._C` compiled from every `csrc/*.cpp` with torch's BuildExtension.

Without torch or a compiler at build time the package still installs; the CPU ops then use the
torch fallback and warn once (see petal_fast/_ext.py).
"""
import glob
import os
import sys
import warnings

from setuptools import setup

packages = ["petal_fast", "petal_fast.kernels"] + [
    "petal_fast." + d for d in ("ops", "reference", "nn", "quality", "models", "data", "eval")
]
package_dir = {"petal_fast": "petal_fast", "petal_fast.kernels": "kernels"}

ext_modules, cmdclass = [], {}
if os.environ.get("PETAL_FAST_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warnings.warn("torch is not importable at build time: building without the C++ backend "
                      "(install with `pip install --no-build-isolation .` to build it)")
    else:
        sources = sorted(glob.glob("csrc/*.cpp"))
        flags = ["-O3", "-std=c++20", "-fopenmp"] if sys.platform != "win32" else ["/O2"]
        ext_modules = [CppExtension("petal_fast._C", sources, extra_compile_args=flags,
                                    extra_link_args=["-fopenmp"] if sys.platform != "win32" else [])]

        class LenientBuild(BuildExtension):
            """Build the extension; on failure (no compiler) warn and install without it."""

            def run(self):
                try:
                    super().run()
                except Exception as err:  # noqa: BLE001 - any toolchain failure means "no extension"
                    warnings.warn(f"petal_fast C++ backend not built ({err}); using the torch fallback")

        cmdclass = {"build_ext": LenientBuild.with_options(use_ninja=True)}

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
