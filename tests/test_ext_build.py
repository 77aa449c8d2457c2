"""Loading the compiled CPU ops (petal_fast._ext): choices and messages that need no compile.
The real builds (isolated install, just-in-time build, cache, lock) are in test_install_routes.py."""
from __future__ import annotations

import importlib.machinery
import json
import shutil
from pathlib import Path

import pytest
import torch

from petal_fast import _build, _ext, info, settings


def test_build_mode():
    for value, mode in [(None, "auto"), ("", "auto"), ("Never", "never"), (" always ", "always")]:
        environ = {} if value is None else {"PETAL_FAST_BUILD": value}
        assert settings.from_environ(environ).build == mode
    with pytest.raises(ValueError, match="PETAL_FAST_BUILD must be one of auto, never, always; got 'sometimes'"):
        settings.from_environ({"PETAL_FAST_BUILD": "sometimes"})


def test_sources_found_and_hashed(tmp_path):
    src = _build.source_dir()
    assert src is not None and (src / "petal_linear.cpp").exists()
    assert _build.BINDING not in {p.name for p in _build.op_sources(src)}
    copy = tmp_path / "csrc"
    shutil.copytree(src, copy)
    assert _build.source_hash(copy) == _build.source_hash(src)
    (copy / "hash32.h").write_text((copy / "hash32.h").read_text() + "\n// changed\n")
    assert _build.source_hash(copy) != _build.source_hash(src)  # headers count too


def test_cache_key_and_root(monkeypatch, tmp_path):
    key = _build.build_key("2.13.0", "g++ 12", "abc")
    assert key == _build.build_key("2.13.0", "g++ 12", "abc")
    assert len({key, _build.build_key("2.12.0", "g++ 12", "abc"), _build.build_key("2.13.0", "g++ 13", "abc"),
                _build.build_key("2.13.0", "g++ 12", "abd")}) == 4
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the system's variable, read when used
    assert _build.cache_root(None) == tmp_path / "xdg" / "petal_fast"
    mine = settings.from_environ({"PETAL_FAST_CACHE_DIR": str(tmp_path / "mine")}).cache_dir
    assert _build.cache_root(mine) == tmp_path / "mine"


def test_no_compiler_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    st = _ext.Status(mode="auto")
    with pytest.raises(_ext.BuildError, match="no C\\+\\+ compiler") as err:
        _ext._jit(st, tmp_path / "cache")
    assert "apt-get install g++" in str(err.value) and "no-such-compiler" in str(err.value)
    assert not (tmp_path / "cache").exists()  # nothing attempted


def test_unwritable_cache_names_the_setting(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should go")
    with pytest.raises(_ext.BuildError, match="cannot write the build cache .*PETAL_FAST_CACHE_DIR"):
        _ext._jit(_ext.Status(mode="auto"), blocker / "cache")


def test_aot_built_for_another_torch_is_not_imported(monkeypatch, tmp_path):
    """setup.py records the torch it built against beside _C; a mismatch skips _C before importing
    it (its static op registrations would otherwise run against the wrong torch)."""
    fake = tmp_path / "_C.cpython-fake.so"
    fake.write_bytes(b"not a library")
    (tmp_path / "_C.json").write_text(json.dumps({"torch": "1.0.0"}))
    spec = importlib.machinery.ModuleSpec("petal_fast._C", None, origin=str(fake))
    monkeypatch.setattr(_ext.importlib.util, "find_spec", lambda name: spec)
    st = _ext.Status(mode="auto")
    assert not _ext._try_aot(st)
    assert f"built for torch 1.0.0, this is torch {torch.__version__}" in st.notes[-1]


def test_already_registered_ops_are_not_registered_again(tmp_path):
    """PETAL_FAST_BUILD=always with the ops already loaded (here: the dev install's _C) reuses them."""
    if _ext.status().source is None:
        pytest.skip(f"compiled ops unavailable here: {_ext.load_error()}")
    st = _ext._load("always", tmp_path / "cache")
    assert st.source == "preloaded" and st.error is None


def test_dev_install_records_its_torch():
    st = _ext.status()
    if st.source != "aot":
        pytest.skip(f"not an ahead-of-time build here ({st.source}: {st.error})")
    assert st.built_for == torch.__version__ and Path(st.path).with_name("_C.json").exists()


def test_info_reports_and_require_fast(monkeypatch, capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    for needle in ("petal_fast", f"torch        {torch.__version__}", "petal_linear", "margin_loss", "brisque",
                   "threads", "compiled CPU ops"):
        assert needle in out
    broken = _ext.Status(mode="auto", error="no C++ compiler: `c++` is not on PATH")
    monkeypatch.setattr(_ext, "status", lambda: broken)
    monkeypatch.setattr(_ext, "has_op", lambda name: False)
    assert info.main([]) == 0
    assert info.main(["--require-fast"]) == 1
    captured = capsys.readouterr()
    assert "UNAVAILABLE: no C++ compiler" in captured.out and "no C++ compiler" in captured.err
    row = next(line for line in captured.out.splitlines() if line.startswith("petal_linear"))
    assert row.split()[1] == "torch" and "cpp: compiled CPU ops unavailable" in row
