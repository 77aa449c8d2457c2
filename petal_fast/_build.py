"""How ``csrc/`` is compiled, in one place for both builds (docs/design.md §3.2).

setup.py loads this file by path (torch-free, petal_fast not importable yet) for the ahead-of-time
extension ``petal_fast._C``; :mod:`petal_fast._ext` uses it for the just-in-time build in the user
cache. Nothing here imports torch. petal_fast's own variables (``PETAL_FAST_BUILD``,
``PETAL_FAST_CACHE_DIR``) are read by :mod:`petal_fast.settings` and passed in; the compiler's
``CXX`` and ``XDG_CACHE_HOME`` are the system's, read here when used.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BINDING = "module.cpp"  # the pybind11 module of the AOT build; the JIT build loads a plain library
JIT_NAME = "petal_fast_ops"


def cxx_flags(platform: str = sys.platform) -> list[str]:
    """-fno-math-errno: the ops never read errno, and without it GCC keeps std::sqrt scalar (a branch
    to set errno on negative input) in the loops it would otherwise vectorise (csrc/brisque.cpp).
    -ffp-contract=off: no a·b + c fused into an FMA, so the AVX-512 clone of a loop (which has FMA)
    rounds exactly as the AVX2 and baseline clones (which do not): the same bits on every CPU."""
    if platform == "win32":
        return ["/O2", "/std:c++20", "/openmp"]
    return ["-O3", "-DNDEBUG", "-std=c++20", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]


def ld_flags(platform: str = sys.platform) -> list[str]:
    return [] if platform == "win32" else ["-fopenmp"]


def source_dir() -> Path | None:
    """The C++ sources: ``petal_fast/csrc`` in an installed wheel, ``<repo>/csrc`` in a source
    checkout or an editable install. None when neither exists."""
    for candidate in (PACKAGE_DIR / "csrc", PACKAGE_DIR.parent / "csrc"):
        if any(candidate.glob("*.cpp")):
            return candidate
    return None


def op_sources(src: Path) -> list[Path]:
    """The files that register ops (``TORCH_LIBRARY_FRAGMENT``): every ``.cpp`` except the binding."""
    return sorted(p for p in src.glob("*.cpp") if p.name != BINDING)


def source_hash(src: Path) -> str:
    """sha256 over every source and header (name and bytes) and the compile flags."""
    h = hashlib.sha256()
    for path in sorted(list(src.glob("*.cpp")) + list(src.glob("*.h"))):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(cxx_flags() + ld_flags()).encode())
    return h.hexdigest()


def compiler() -> tuple[str, str] | None:
    """(path, first line of ``--version``) of the C++ compiler torch's build uses (``$CXX``, else
    ``c++``), or None if it is not on PATH."""
    name = os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")
    path = shutil.which(name)
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        version = (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        version = "unknown version"
    return path, version


def missing_compiler_message() -> str:
    name = os.environ.get("CXX") or "c++"
    return (f"no C++ compiler: `{name}` (the CXX environment variable, else c++) is not on PATH. "
            "Install one (Debian/Ubuntu: `apt-get install g++`; Fedora/RHEL: `dnf install gcc-c++`; "
            "conda: `conda install -c conda-forge cxx-compiler`) or set CXX, then run `petal-fast info` "
            "to build the compiled CPU ops once (~1 min)")


def cache_root(configured: Path | None) -> Path:
    """``configured`` (the ``cache_dir`` setting, ``PETAL_FAST_CACHE_DIR``), else
    ``$XDG_CACHE_HOME/petal_fast``, else ``~/.cache/petal_fast``."""
    if configured is not None:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "petal_fast"


def build_key(torch_version: str, compiler_version: str, sources: str) -> str:
    """The cache key: a build is reused only for the same torch, compiler, sources and Python ABI."""
    parts = [torch_version, compiler_version, sources, sys.implementation.cache_tag or "", sys.platform]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
