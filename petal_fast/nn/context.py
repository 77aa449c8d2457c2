"""How α reaches PetalLinear layers buried in a backbone whose forward knows nothing of α.

    with petal_fast.quality(alpha):      # alpha: (images,) in [0, 1]
        embeddings = backbone(images)

Every two-branch PetalLinear called inside the block without an explicit ``alpha=`` uses it.
Contexts nest; the innermost wins. Thread-local, so data-parallel threads do not mix them.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch



class _Stack(threading.local):
    """A per-thread stack that always exists (a lazily created one would change what a compiled
    graph's guards see after the first ``with`` block, and force a recompile)."""

    def __init__(self) -> None:
        self.stack: list = []


_local = _Stack()


@contextlib.contextmanager
def quality(alpha: torch.Tensor) -> Iterator[torch.Tensor]:
    """Provide the per-image quality weight α to every PetalLinear inside the block."""
    if not isinstance(alpha, torch.Tensor):
        raise TypeError(f"quality(alpha): alpha must be a tensor, got {type(alpha).__name__}")
    stack = _local.stack
    stack.append(alpha)
    try:
        yield alpha
    finally:
        stack.pop()


def current_alpha() -> torch.Tensor | None:
    stack = _local.stack
    return stack[-1] if stack else None
