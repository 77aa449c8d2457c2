"""Loads the C++ extension ``petal_fast._C`` (built from ``csrc/``) if it exists.

The C++ ops register themselves with ``TORCH_LIBRARY_FRAGMENT(petal_fast, m)``, one source file
per op, and are called as ``torch.ops.petal_fast.<name>``.
"""
from __future__ import annotations

import functools

import torch

_error: str | None = None
try:
    from petal_fast import _C  # noqa: F401  (importing registers the ops)
except ImportError as err:  # not built: the torch fallback is used
    _error = str(err)


def load_error() -> str | None:
    return _error


@functools.cache  # ops register once, at import: the answer never changes in a process
def has_op(name: str) -> bool:
    """Whether ``torch.ops.petal_fast.<name>`` (or ``<name>_fwd``) exists: extension built, op compiled in."""
    if _error is not None:
        return False
    for candidate in (name, name + "_fwd"):
        try:
            getattr(torch.ops.petal_fast, candidate)
            return True
        except (AttributeError, RuntimeError):
            continue
    return False


@functools.cache
def op(name: str):
    return getattr(torch.ops.petal_fast, name)
