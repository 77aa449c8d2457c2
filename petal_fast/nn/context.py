"""How α reaches PetalLinear layers buried in a backbone whose forward knows nothing of α.

    with petal_fast.alpha_scope(alpha):      # alpha: (images,) in [0, 1]
        embeddings = backbone(images)

Every two-branch PetalLinear called inside the block without an explicit ``alpha=`` uses it.
Contexts nest; the innermost wins. Thread-local, so data-parallel threads do not mix them.
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
    """The α of one ``with alpha_scope(alpha):`` block and the dropout seed its layers share.

    ``seed`` gives the layers with dropout one seed drawn once for the block on the device (each layer
    hashes it with its own stream); a layer called a second time in the block gets None and draws its
    own. Plain attribute and set updates, so eager and torch.compile draw the same seeds. Nothing
    outlives the block.
    """

    alpha: torch.Tensor | None
    _seed: torch.Tensor | None = None
    _seeded: set = dataclasses.field(default_factory=set)

    def seed(self, stream: int, device: torch.device) -> torch.Tensor | None:
        """The block's dropout seed for the layer of ``stream`` (drawn on ``device`` by its generator at
        the first request: a kernel on CUDA, no host→device copy), or None for a layer asking again."""
        if stream in self._seeded or (self._seed is not None and self._seed.device != device):
            return None
        self._seeded.add(stream)
        if self._seed is None:
            self._seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
        return self._seed


@contextlib.contextmanager
def alpha_scope(alpha: torch.Tensor | None) -> Iterator[AlphaScope]:
    """Provide the per-image quality weight α to every two-branch PetalLinear inside the block, and one
    dropout seed to all its layers. ``alpha_scope(None)`` marks a forward pass of one-branch layers
    (plain LoRA): the seed only."""
    if alpha is not None and not isinstance(alpha, torch.Tensor):
        raise TypeError(f"alpha_scope(alpha): alpha must be a tensor, got {type(alpha).__name__}")
    scope = AlphaScope(alpha)
    stack = _local.stack
    stack.append(scope)
    try:
        yield scope
    finally:
        stack.pop()


def current_scope() -> AlphaScope | None:
    """The innermost :func:`alpha_scope` of this thread, or None."""
    stack = _local.stack
    return stack[-1] if stack else None


def current_alpha() -> torch.Tensor | None:
    scope = current_scope()
    return None if scope is None else scope.alpha
