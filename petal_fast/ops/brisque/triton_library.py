"""BRISQUE's Triton backend as a ``torch.library.triton_op`` (torch.compile sees the kernel).

    petal_fast::triton_brisque(images, features) -> (B,) scores | (B, 36) features, float64

The body of ``petal_fast::fused_brisque`` (:mod:`.library`: luminance, half-size resize, the
fused MSCN-moments kernel per scale, AGGD fits, SVR), with the kernel launched through
``wrap_triton``: under torch.compile Inductor schedules the moments kernel and fuses the torch
stages around it. Two things a compiled graph cannot do without reading values on the host: the
[0, 1] check of float images becomes a device-side assert (its message without the range found),
and degenerate images are scored +inf without the warning that counts them. Eager calls keep both.
The interpreter caveat of ``ops/_graph.launchable`` applies.
"""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from .._graph import launchable
from .library import brisque_impl

NAME = "petal_fast::triton_brisque"


@triton_op(NAME, mutates_args=())
def triton_brisque(images: Tensor, features: bool) -> Tensor:
    return brisque_impl(images, features, "triton", wrap=launchable)
