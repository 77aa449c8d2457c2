"""The first-use build cache checks an entry before loading it: a damaged library is rebuilt, never
loaded (a truncated or partly zeroed shared library kills the process inside dlopen, SIGBUS / SIGSEGV).

A real cache entry is made from the ahead-of-time library of this install (a plain shared library to
the loader, with the same op registrations as a just-in-time build) instead of compiling one, which
takes minutes; the real builds are tests/test_install_routes.py's. The damaged entry is loaded in a
subprocess, as a later ``petal-fast info`` or training process would, where a crash is a signal."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from petal_fast import _build, _ext

ROOT = Path(__file__).resolve().parents[1]

# The child's "compiler": copies the good library into the entry and records it, as _compile does.
CHILD = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    from petal_fast import _ext, settings
    good = Path(sys.argv[1])
    def fake_compile(src, build_dir, meta):
        for child in build_dir.iterdir():
            child.unlink()
        shutil.copyfile(good, build_dir / "petal_fast_ops.so")
        _ext._record(build_dir, meta, 0.0)
        import torch
        torch.ops.load_library(str(build_dir / "petal_fast_ops.so"))
    _ext._compile = fake_compile
    st = _ext.status()
    import torch
    e, w = torch.randn(3, 8), torch.randn(5, 8)
    lse, zsum = _ext.op("margin_loss_fwd")(e, w, torch.tensor([0, 1, 4]), 64.0, 1e-6)
    print(json.dumps({"source": st.source, "built_now": st.built_now, "notes": st.notes, "error": st.error,
                      "finite": bool(torch.isfinite(lse).all())}))
""")


def _aot_library() -> Path:
    st = _ext.status()
    if st.source != "aot":
        pytest.skip(f"needs the ahead-of-time library of a dev install ({st.source}: {st.error})")
    return Path(st.path)


def _entry(cache: Path) -> tuple[Path, dict]:
    """The entry folder a just-in-time build would use here, and what its build.json must record."""
    cxx = _build.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler: the just-in-time route is not taken")
    key = _build.build_key(torch.__version__, cxx[1], _build.source_hash(_build.source_dir()))
    meta = {"torch": torch.__version__, "compiler": cxx[1], "key": key, "python": sys.version.split()[0]}
    return cache / f"torch-{torch.__version__}-{key}", meta


def _load_in_child(cache: Path, good: Path) -> dict:
    env = {**os.environ, "PETAL_FAST_BUILD": "always", "PETAL_FAST_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(good)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode} (a negative status is the signal): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _damage(library: Path, how: str) -> None:
    """Damage inside the loaded segments (the code starts a few KiB in; most of the file's bytes are
    symbols and debug information, which the loader never maps). Loaded as they are, the truncated
    file dies of SIGBUS and the zeroed one of SIGSEGV (both seen before the check existed)."""
    data = bytearray(library.read_bytes())
    if how == "truncated":
        library.write_bytes(bytes(data[: 96 * 1024]))
    elif how == "zeroed":  # same size, code zeroed: only the hash tells
        data[64 * 1024:192 * 1024] = bytes(128 * 1024)
        library.write_bytes(bytes(data))
    else:
        library.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "zeroed", "empty"])
def test_damaged_cache_entry_is_rebuilt_not_loaded(tmp_path, how):
    good = _aot_library()
    cache = tmp_path / "cache"
    build_dir, meta = _entry(cache)
    build_dir.mkdir(parents=True)
    library = build_dir / f"{_build.JIT_NAME}.so"
    shutil.copyfile(good, library)
    _ext._record(build_dir, meta, 0.0)
    recorded = json.loads((build_dir / "build.json").read_text())
    assert recorded["size"] == good.stat().st_size and len(recorded["sha256"]) == 64

    intact = _load_in_child(cache, good)  # an intact entry is loaded as it is
    assert intact == {"source": "jit", "built_now": False, "notes": [], "error": None, "finite": True}

    _damage(library, how)
    st = _load_in_child(cache, good)
    assert st["source"] == "jit" and st["built_now"] and st["error"] is None and st["finite"]
    assert any("is damaged" in n and "rebuilt" in n for n in st["notes"]), st["notes"]
    assert library.read_bytes() == good.read_bytes()  # rebuilt in place


def test_entry_without_a_recorded_hash_is_rebuilt(tmp_path):
    """An entry written before sizes and hashes were recorded cannot be checked: rebuilt once."""
    good = _aot_library()
    cache = tmp_path / "cache"
    build_dir, meta = _entry(cache)
    build_dir.mkdir(parents=True)
    shutil.copyfile(good, build_dir / f"{_build.JIT_NAME}.so")
    (build_dir / "build.json").write_text(json.dumps({**meta, "seconds": 60.0}))
    st = _load_in_child(cache, good)
    assert st["built_now"] and any("no recorded size and hash" in n for n in st["notes"])
    assert "sha256" in json.loads((build_dir / "build.json").read_text())
