"""How α reaches PetalLinear layers buried in a backbone whose forward knows nothing of α.

    with petal_fast.alpha_scope(alpha):      # alpha: (images,) in [0, 1]
        embeddings = backbone(images)

Every two-branch PetalLinear called inside the block without an explicit ``alpha=`` uses it.
Contexts nest; the innermost wins. ``petal_fast.quality(alpha)`` is the same context under its earlier
name. Thread-local, so data-parallel threads do not mix them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator

import torch


class _Stack(threading.local):
    """A per-thread stack that always exists (a lazily created one would change what a compiled
    graph's guards see after the first ``with`` block, and force a recompile)."""

    def __init__(self) -> None:
        self.stack: list = []


_local = _Stack()


@dataclasses.dataclass(eq=False)
class AlphaScope:
    """The α of one ``with alpha_scope(alpha):`` block and what its layers share.

    ``shared`` is filled by :func:`petal_fast.ops.petal_linear`: α's value check and its branch
    weights per (scale, dtype), done once for all the layers of a forward pass instead of once per
    layer (3–5 kernel launches each on CUDA); an in-place change of α inside the block is seen (its
    version counter moves) and redoes them. Nothing outlives the block.
    """

    alpha: torch.Tensor
    shared: dict = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def alpha_scope(alpha: torch.Tensor) -> Iterator[AlphaScope]:
    """Provide the per-image quality weight α to every two-branch PetalLinear inside the block."""
    if not isinstance(alpha, torch.Tensor):
        raise TypeError(f"alpha_scope(alpha): alpha must be a tensor, got {type(alpha).__name__}")
    scope = AlphaScope(alpha)
    stack = _local.stack
    stack.append(scope)
    try:
        yield scope
    finally:
        stack.pop()


@contextlib.contextmanager
def quality(alpha: torch.Tensor) -> Iterator[torch.Tensor]:
    """The earlier name of :func:`alpha_scope`, kept for existing code (``with petal_fast.quality(α):``);
    yields α itself."""
    with alpha_scope(alpha):
        yield alpha


def current_scope() -> AlphaScope | None:
    """The innermost :func:`alpha_scope` of this thread, or None."""
    stack = _local.stack
    return stack[-1] if stack else None


def current_alpha() -> torch.Tensor | None:
    scope = current_scope()
    return None if scope is None else scope.alpha
