"""The margin loss core's backends: name → (forward, backward), one signature for all of them.

    forward(e, w, labels, s, ε[, wrap])                                   -> (lse, zsum)
    backward(e, w, labels, lse, g_lse, g_zsum, s, ε, need_e, need_w[, wrap]) -> (dE | None, dW | None)

over the non-target classes (the target path is torch, in :mod:`.library`). ``torch``:
:mod:`.torch_impl`; ``cpp``: the C++ ops ``margin_loss_fwd`` / ``margin_loss_bwd``
(``csrc/margin_loss.cpp``); ``triton``: ``kernels/margin_loss.py``, imported on first use.
``reference`` is not a table entry: the dispatcher calls ``petal_fast.reference.margin_loss``.
"""
from __future__ import annotations

import functools
from typing import Callable

from petal_fast import _ext

from . import torch_impl


def _torch() -> tuple[Callable, Callable]:
    return torch_impl.forward, torch_impl.backward


def _cpp() -> tuple[Callable, Callable]:
    return _ext.op("margin_loss_fwd"), _ext.op("margin_loss_bwd")


def _triton() -> tuple[Callable, Callable]:
    from petal_fast.kernels import margin_loss as launch
    return launch.forward, launch.backward


BACKENDS: dict[str, Callable[[], tuple[Callable, Callable]]] = {"torch": _torch, "cpp": _cpp, "triton": _triton}


@functools.cache
def implementation(backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) of a resolved non-reference backend, built on first use."""
    return BACKENDS[backend]()
