"""The C++ PetalLinear's tuning knobs, set explicitly (the defaults are measured; see README).

The CPU PetalLinear (``csrc/petal_linear.cpp``) chooses per call between row blocks that stay in
cache and whole-matrix BLAS calls, and how many rows a block has. Two knobs override those
choices for re-tuning on another machine. They are read from the environment once, when the
first PetalLinear runs (``PETAL_FAST_CPU_PATH=blocked|whole``, ``PETAL_FAST_CPU_BLOCK_ROWS=n``);
changing the environment later has no effect. To change them in a running process::

    from petal_fast.cpu_tuning import cpu_tuning
    with cpu_tuning(path="whole", block_rows=64):
        ...                                   # previous settings restored on exit
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from petal_fast import _ext

PATHS = ("auto", "blocked", "whole")


def _op():
    if not _ext.has_op("petal_linear_cpu_tuning"):
        raise RuntimeError(f"the C++ extension is not available ({_ext.load_error() or 'op missing'}): there are "
                           "no CPU tuning knobs to set; build it with `pip install --no-build-isolation -e .`")
    return _ext.op("petal_linear_cpu_tuning")


def get_cpu_tuning() -> tuple[str, int]:
    """(path, block_rows) in force: path ``auto`` | ``blocked`` | ``whole``, block_rows 0 for automatic."""
    path, rows = _op()(None, None)
    return str(path), int(rows)


def set_cpu_tuning(path: str | None = None, block_rows: int | None = None) -> tuple[str, int]:
    """Set the knobs given (None keeps one); returns the settings now in force."""
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if block_rows is not None and (not isinstance(block_rows, int) or block_rows < 0):
        raise ValueError(f"block_rows must be 0 (automatic) or a positive integer, got {block_rows!r}")
    new_path, rows = _op()(path, block_rows)
    return str(new_path), int(rows)


@contextlib.contextmanager
def cpu_tuning(path: str | None = None, block_rows: int | None = None) -> Iterator[tuple[str, int]]:
    """Set the knobs inside a ``with`` block; the previous settings come back on exit."""
    before = get_cpu_tuning()
    try:
        yield set_cpu_tuning(path, block_rows)
    finally:
        set_cpu_tuning(*before)
