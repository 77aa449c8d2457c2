"""Backend selection (docs/design.md §3).

Every fused op has the same signature on every backend:

- ``triton``    — Triton kernels from ``petal_fast.kernels`` (CUDA tensors; CPU tensors only under
                  ``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU);
- ``cpp``       — the compiled ops from ``csrc/`` (CPU tensors): the extension ``petal_fast._C`` or
                  the just-in-time build of :mod:`petal_fast._ext`;
- ``torch``     — a plain torch composition with the same memory behaviour as the fused paths;
- ``reference`` — the literal formula from ``petal_fast.reference`` (float64-capable test oracle).

``auto`` (the default) picks ``triton`` for CUDA tensors and ``cpp`` for CPU tensors, falling back
to ``torch`` with one warning when the extension or Triton is missing. Force a backend for the
process with ``PETAL_FAST_BACKEND`` / ``petal_fast.settings.configure(backend=name)`` or, scoped and
per thread, with ``petal_fast.use_backend(name)``, which wins.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
import warnings
from typing import Iterator

import torch

from petal_fast import _ext, settings
from petal_fast.settings import BACKENDS  # noqa: F401  (re-exported)


class _Stack(threading.local):
    """A per-thread stack that always exists (a lazily created one would change what a compiled
    graph's guards see after the first ``with`` block, and force a recompile)."""

    def __init__(self) -> None:
        self.stack: list = []


_local = _Stack()
_warned: set[str] = set()


def requested_backend() -> str:
    """The backend asked for: the innermost ``use_backend`` block of this thread, else the setting
    (``PETAL_FAST_BACKEND`` / ``settings.configure(backend=...)``, default auto)."""
    stack = _local.stack
    if stack:
        return stack[-1]
    return settings.current().backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Force every petal_fast op inside the ``with`` block (in this thread) onto backend ``name``."""
    name = settings.parse("backend", name)
    stack = _local.stack
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@functools.cache  # find_spec searches sys.path: once per process, not per layer call
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(device: torch.device, op: str, supported: tuple[str, ...] = BACKENDS) -> str:
    """Choose the backend for an op whose tensors live on ``device``.

    ``supported`` lists the backends the op implements. An explicitly forced backend that cannot
    run here raises; ``auto`` degrades to ``torch`` with one warning per op.
    """
    want = requested_backend()  # traced under torch.compile: Dynamo guards on the context / environment
    if torch.compiler.is_compiling():
        return _resolve_constant(device.type, op, supported, want)
    key = (device.type, op, supported, want, triton_interpreting(), device.type == "cpu" and _ext.has_op(op))
    backend = _resolved.get(key)
    if backend is None:  # what is built and installed does not change in a process: decide once
        backend = _resolve(device.type, op, supported, want)
        if want != "auto" or backend in ("cpp", "triton"):  # a fallback is not cached: it warns (once per op)
            _resolved[key] = backend
    return backend


_resolved: dict[tuple, str] = {}


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo (≈1 s, and it imports
    Triton) when petal_fast is imported: that decorator only sets this marker, which Dynamo reads
    when it traces a call (tests/test_import.py checks the two agree on the installed torch)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _resolve_constant(device_type: str, op: str, supported: tuple[str, ...], want: str) -> str:
    """``_resolve`` as a constant of a traced graph: what is built and installed does not change in a process."""
    return _resolve(device_type, op, supported, want)


def _resolve(device_type: str, op: str, supported: tuple[str, ...], want: str) -> str:

    device = torch.device(device_type)
    if want == "auto":
        if device.type == "cuda" and "triton" in supported and triton_available():
            return "triton"
        if device.type == "cpu" and "cpp" in supported:
            if _ext.has_op(op):
                return "cpp"
            warn_once(f"nocpp-{op}", f"petal_fast: compiled CPU op {op!r} unavailable "
                      f"({_ext.load_error() or 'op missing from the compiled library'}); using the torch "
                      "fallback. `petal-fast info` shows this again.")
        if device.type == "cuda" and "triton" in supported:
            warn_once(f"notriton-{op}", f"petal_fast: Triton is not installed; {op!r} uses the torch fallback")
        return "torch" if "torch" in supported else "reference"
    if want not in supported:
        raise ValueError(f"{op}: backend {want!r} is not implemented (available: {supported})")
    if want == "cpp":
        if device.type != "cpu":
            raise ValueError(f"{op}: the cpp backend runs on CPU tensors, got {device}")
        if not _ext.has_op(op):
            raise RuntimeError(f"{op}: the C++ extension is not available "
                               f"({_ext.load_error() or 'op missing from the compiled library'})")
    if want == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend 'triton' requested but Triton is not installed (pip install triton)")
        if device.type == "cpu" and not triton_interpreting():
            raise ValueError(f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 "
                             "(the Triton interpreter); use a CUDA device otherwise")
    return want
