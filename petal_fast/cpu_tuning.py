"""The C++ PetalLinear's tuning knobs, set explicitly.

The CPU PetalLinear (``csrc/petal_linear.cpp``) chooses per call between row blocks that stay in
cache and whole-matrix BLAS calls, and how many rows a block has (the rule: docs/design.md §3.3).
Two settings override those choices for re-tuning on another machine: ``cpu_path``
(``PETAL_FAST_CPU_PATH=auto|blocked|whole``) and ``cpu_block_rows`` (``PETAL_FAST_CPU_BLOCK_ROWS=n``,
0 automatic), read with every other setting when petal_fast is imported (:mod:`petal_fast.settings`)
and passed to the C++ ops with every call (``ops/petal_linear/backends.cpu_knobs``): the library keeps
no copy, so a ``with`` block changes them for the calls of its thread only.
To change them in a running process::

    from petal_fast.cpu_tuning import cpu_tuning
    with cpu_tuning(path="whole", block_rows=64):
        ...                                   # previous settings restored on exit

which is ``petal_fast.settings.override(cpu_path=..., cpu_block_rows=...)`` that first checks that
the compiled ops are there to tune (``settings.configure`` alone also works without them).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from petal_fast import _ext, settings

PATHS = settings.CPU_PATHS


def _op() -> None:
    if not _ext.has_op("petal_linear"):
        raise RuntimeError(f"the C++ extension is not available ({_ext.load_error() or 'op missing'}): there are "
                           "no CPU tuning knobs to set; build it with `pip install --no-build-isolation -e .`")


def _changes(path: str | None, block_rows: int | None) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if path is not None:
        changes["cpu_path"] = settings.parse("cpu_path", path, "path")
    if block_rows is not None:
        changes["cpu_block_rows"] = settings.parse("cpu_block_rows", block_rows, "block_rows")
    return changes


def get_cpu_tuning() -> tuple[str, int]:
    """(path, block_rows) this thread's C++ PetalLinear calls use: path ``auto`` | ``blocked`` |
    ``whole``, block_rows 0 for automatic."""
    _op()
    current = settings.current()
    return current.cpu_path, current.cpu_block_rows


def set_cpu_tuning(path: str | None = None, block_rows: int | None = None) -> tuple[str, int]:
    """Set the knobs given (None keeps one) for the rest of the process; returns the settings now in force."""
    changes = _changes(path, block_rows)
    _op()
    settings.configure(**changes)
    return get_cpu_tuning()


@contextlib.contextmanager
def cpu_tuning(path: str | None = None, block_rows: int | None = None) -> Iterator[tuple[str, int]]:
    """Set the knobs inside a ``with`` block; the previous settings come back on exit."""
    changes = _changes(path, block_rows)
    _op()
    with settings.override(**changes):
        yield get_cpu_tuning()
