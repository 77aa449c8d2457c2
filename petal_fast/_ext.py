"""The compiled CPU ops ``torch.ops.petal_fast.*`` (``csrc/``): ahead of time or just in time.

Each op registers itself with ``TORCH_LIBRARY_FRAGMENT(petal_fast, m)`` in its own source file, so
loading any library built from ``csrc/`` makes the ops callable. At first use, by the ``build``
setting of :mod:`petal_fast.settings` (``PETAL_FAST_BUILD``; docs/design.md §3.2):

- ``auto`` (default): the extension ``petal_fast._C`` that setup.py built, if it exists, was built
  for the running torch and imports; otherwise (an isolated ``pip install .``, a wheel, another torch:
  ImportError / undefined symbol) ``csrc/`` is compiled now with ``torch.utils.cpp_extension`` and
  ninja into ``<cache>/<torch version>-<key>/``, the key hashing (torch, compiler, sources, Python),
  under a file lock so that the ranks of a ``torchrun`` job build it once and then all load it;
- ``never``: only ``petal_fast._C``; ``always``: the just-in-time build even when ``_C`` exists.

Whatever fails is kept as a message that says what is missing and how to fix it; the ops then use
the torch fallback (one warning) and ``petal-fast info`` repeats the message.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from petal_fast import _build, settings

# One op of each source file: all present means a library from csrc/ is already loaded.
PROBE_OPS = ("petal_linear_fwd", "margin_loss_fwd", "brisque_score")


@dataclasses.dataclass
class Status:
    """Where the compiled ops came from: ``source`` "aot" (petal_fast._C), "jit" (the cache) or None."""
    mode: str
    source: str | None = None
    path: str | None = None          # the loaded library
    built_for: str | None = None     # the torch version it was compiled against
    compiler: str | None = None
    built_now: bool = False          # this process compiled it
    error: str | None = None         # why there are no compiled ops (first line: the cause)
    notes: list[str] = dataclasses.field(default_factory=list)  # why a candidate was skipped
    cache: Path | None = None        # the just-in-time build cache in force when loading


class BuildError(RuntimeError):
    pass


_lock = threading.Lock()
_status: Status | None = None


_when_loaded: list[Callable[[], None]] = []


def status() -> Status:
    """Load (and if needed build) the compiled ops once per process, as the settings in force then
    say (``build``, ``cache_dir``); never raises."""
    global _status
    with _lock:
        loading = _status is None
        if loading:
            config = settings.current()
            _status = _load(config.build, _build.cache_root(config.cache_dir))
    if loading and _status.source is not None:
        for fn in _when_loaded:
            fn()
    return _status


def when_loaded(fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` once the compiled ops are loaded (at once if they are): for registrations that
    concern them, such as fake implementations, without loading or building them at import."""
    if _status is None:
        _when_loaded.append(fn)
    elif _status.source is not None:
        fn()
    return fn


def load_error() -> str | None:
    return status().error


@functools.cache  # ops register once per process: the answer never changes
def has_op(name: str) -> bool:
    """Whether ``torch.ops.petal_fast.<name>`` (or ``<name>_fwd``) exists after loading the compiled ops."""
    if status().source is None:
        return False
    return any(_registered(candidate) for candidate in (name, name + "_fwd"))


@functools.cache
def op(name: str):
    status()
    return getattr(torch.ops.petal_fast, name)


def _registered(name: str) -> bool:
    try:
        getattr(torch.ops.petal_fast, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _load(mode: str, cache: Path) -> Status:
    st = Status(mode=mode, cache=cache)
    if mode != "always" and _try_aot(st):
        return st
    if mode == "never":
        st.error = ("PETAL_FAST_BUILD=never and no usable ahead-of-time extension petal_fast._C"
                    + (f" ({st.notes[-1]})" if st.notes else "")
                    + "; unset PETAL_FAST_BUILD to build the ops on first use, or reinstall with "
                    "`pip install --no-build-isolation .`")
        return st
    if all(_registered(name) for name in PROBE_OPS):  # loaded by someone else: never register twice
        st.source, st.built_for = "preloaded", torch.__version__
        return st
    try:
        _jit(st, cache)
    except BuildError as err:
        st.error = str(err)
    except Exception as err:  # noqa: BLE001 - any toolchain failure means "use the fallback", said clearly
        st.error = f"building the C++ ops failed: {_first_line(err)}"
    return st


def _try_aot(st: Status) -> bool:
    """Import ``petal_fast._C`` unless it is absent or its sidecar says another torch built it."""
    spec = importlib.util.find_spec("petal_fast._C")
    if spec is None or spec.origin is None:
        st.notes.append("petal_fast._C not built (an isolated build has no torch to compile against)")
        return False
    sidecar = _aot_sidecar(Path(spec.origin))
    built_for = sidecar.get("torch")
    if built_for is not None and built_for != torch.__version__:
        # importing would run its op registrations against the wrong torch; the JIT build replaces it
        st.notes.append(f"petal_fast._C was built for torch {built_for}, this is torch {torch.__version__}")
        return False
    try:
        from petal_fast import _C  # noqa: F401  (importing registers the ops)
    except ImportError as err:  # built against another torch: undefined symbol and the like
        st.notes.append(f"petal_fast._C does not import: {_first_line(err)}")
        return False
    st.source, st.path, st.built_for, st.compiler = "aot", spec.origin, built_for, sidecar.get("compiler")
    return True


def _aot_sidecar(library: Path) -> dict:
    """What setup.py recorded next to the extension (``_C.json``: torch version, compiler), if anything."""
    try:
        recorded = json.loads(library.with_name("_C.json").read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def _jit(st: Status, root: Path) -> None:
    src = _build.source_dir()
    if src is None:
        raise BuildError("the C++ sources (petal_fast/csrc) are missing from this installation; reinstall "
                         "petal_fast from its repository, a wheel or an sdist")
    cxx = _build.compiler()
    if cxx is None:
        raise BuildError(_build.missing_compiler_message())
    st.compiler = cxx[1]
    key = _build.build_key(torch.__version__, cxx[1], _build.source_hash(src))
    build_dir = root / f"torch-{torch.__version__}-{key}"
    library = build_dir / f"{_build.JIT_NAME}.so"
    meta = {"torch": torch.__version__, "compiler": cxx[1], "key": key, "python": sys.version.split()[0]}
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / f"{build_dir.name}.lock").touch()
    except OSError as err:
        raise BuildError(f"cannot write the build cache {root} ({err.strerror or err}); set PETAL_FAST_CACHE_DIR "
                         "to a writable folder") from err
    with _file_lock(root / f"{build_dir.name}.lock"):
        recorded = _cached(build_dir, meta)
        if recorded is not None:
            damage = _damage(library, recorded)
            if damage is None:
                try:
                    torch.ops.load_library(str(library))
                    st.source, st.path, st.built_for = "jit", str(library), torch.__version__
                    return
                except OSError as err:  # a foreign file: rebuild below
                    damage = f"does not load ({_first_line(err)})"
            st.notes.append(f"cached build {library} {damage}; rebuilt")
        _compile(src, build_dir, meta)
        st.source, st.path, st.built_for, st.built_now = "jit", str(library), torch.__version__, True


def _cached(build_dir: Path, meta: dict) -> dict | None:
    """The entry's ``build.json`` if it records this build (torch, compiler, key, Python), else None."""
    try:
        recorded = json.loads((build_dir / "build.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or any(recorded.get(k) != v for k, v in meta.items()):
        return None
    return recorded


def _digest(library: Path) -> str:
    h = hashlib.sha256()
    with open(library, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _damage(library: Path, recorded: dict) -> str | None:
    """Why ``library`` is not the file the build recorded (size and sha256 in ``build.json``), or None.

    Checked before loading, never after: the dynamic loader maps the file, so a truncated library
    dies of SIGBUS and a partly zeroed one of SIGSEGV inside ``dlopen``, where no Python can catch it.
    An entry from before sizes and hashes were recorded cannot be checked, so it is rebuilt too."""
    try:
        size = library.stat().st_size
    except OSError as err:
        return f"is unreadable ({err.strerror or err})"
    if not isinstance(recorded.get("size"), int) or not isinstance(recorded.get("sha256"), str):
        return "has no recorded size and hash"
    if size != recorded["size"]:
        return f"is damaged ({size} bytes, {recorded['size']} when built)"
    try:
        digest = _digest(library)
    except OSError as err:
        return f"is unreadable ({err.strerror or err})"
    if digest != recorded["sha256"]:
        return "is damaged (its sha256 differs from the one recorded when it was built)"
    return None


def _record(build_dir: Path, meta: dict, seconds: float) -> None:
    """``build.json``: what the entry was built for, and the library's size and hash, checked at load."""
    library = build_dir / f"{_build.JIT_NAME}.so"
    record = {**meta, "seconds": round(seconds, 1), "size": library.stat().st_size, "sha256": _digest(library)}
    tmp = build_dir / f"build.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, build_dir / "build.json")


def _compile(src: Path, build_dir: Path, meta: dict) -> None:
    """Compile and load; called under the file lock, so nothing else uses ``build_dir``."""
    from torch.utils import cpp_extension

    print(f"building petal_fast C++ ops for torch {torch.__version__} (first use, ~1 min) in {build_dir} …",
          file=sys.stderr, flush=True)
    if build_dir.exists():  # a stale or foreign build: start clean (torch's own baton file included)
        for child in build_dir.iterdir():
            if child.is_file():
                child.unlink()
    build_dir.mkdir(parents=True, exist_ok=True)
    _ninja_on_path()
    start = time.perf_counter()
    try:
        cpp_extension.load(name=_build.JIT_NAME, sources=[str(p) for p in _build.op_sources(src)],
                           extra_cflags=_build.cxx_flags(), extra_ldflags=_build.ld_flags(),
                           extra_include_paths=[str(src)], build_directory=str(build_dir),
                           is_python_module=False, verbose=False)
    except Exception as err:
        log = build_dir / "build.log"
        log.write_text(str(err))
        raise BuildError(f"building the C++ ops failed: {_compiler_error(str(err))} (full log: {log})") from err
    _record(build_dir, meta, time.perf_counter() - start)


def _ninja_on_path() -> None:
    """torch's build runs ``ninja`` from PATH; the pip package's binary sits in the venv, which a
    script run as ``.venv/bin/python`` does not have on PATH."""
    dirs = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError, AttributeError):
        import ninja
        dirs.insert(0, ninja.BIN_DIR)
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([d for d in dirs if d not in path.split(os.pathsep)] + [path])


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held until the block ends (released by the OS if the process dies)."""
    with open(path, "a+") as handle:
        if sys.platform == "win32":
            import msvcrt
            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _first_line(err: BaseException | str) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _compiler_error(text: str) -> str:
    """The first compiler diagnostic of a ninja log, else its first line."""
    for line in text.splitlines():
        if "error" in line.lower() and "Error building extension" not in line:
            return line.strip()
    return _first_line(text)
