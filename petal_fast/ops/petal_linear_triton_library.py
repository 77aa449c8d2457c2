"""PetalLinear's Triton backend as ``torch.library.triton_op`` operators: torch.compile sees the kernels.

    petal_fast::triton_petal_linear(x, W, b?, A_cat, B_cat, coef, p, seed, validate) -> (y, U)
    petal_fast::triton_petal_linear_backward(dy, x, W, A_cat, B_cat, coef, U, p, seed, need_x, need_coef)
        -> (dX | empty, dA_cat, dB_cat, dcoef | empty)

Same formulas, outputs and rules as ``petal_fast::fused_petal_linear`` (``petal_linear_library``:
empty batch, dcoef, double backward). The difference is what a compiler sees. These bodies are made
only of torch operations and kernel launches through ``torch.library.wrap_triton``, with no value
read on the host (the dropout seed is a device tensor that the kernels hash themselves). So under
``torch.compile`` AOTAutograd decomposes the operator, and Inductor gets each launch as a node of
its graph (``triton_kernel_wrapper_functional``): it can reuse their buffers, reorder them around
its own kernels and capture them in CUDA graphs. ``torch.export`` keeps the operator whole, which is
PyTorch's rule for triton_op: an exported program stays backend-neutral.

Under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests) a kernel is not a JIT
function. ``wrap_triton`` hands it back unwrapped, and it cannot run on fake tensors. Eager calls
run it. Fake-tensor calls (shape propagation, ``opcheck``) skip the launch, which only writes
outputs the body allocated. A graph compiled under the interpreter uses the opaque
``fused_petal_linear`` instead (``ops/petal_linear.py`` chooses).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._guards import detect_fake_mode
from torch.library import triton_op, wrap_triton

from ._graph import value_check
from .petal_linear_library import _empty, coef_grad, register_petal_autograd

NAME = "petal_fast::triton_petal_linear"


class _NoLaunch:
    """``kernel[grid](...)`` that does nothing: an interpreted kernel met with fake tensors."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _launchable(kernel):
    """``wrap_triton(kernel)``; under the interpreter with fake tensors, no launch (see module doc)."""
    wrapped = wrap_triton(kernel)
    if wrapped is kernel and detect_fake_mode() is not None:
        return _NoLaunch()
    return wrapped


def _kernels():
    from petal_fast.kernels import petal_linear  # Triton is imported only when this backend runs
    return petal_linear


def _check_coef(coef: Tensor) -> None:
    """α's branch weights finite: a device-side assert on CUDA, a ValueError for real CPU tensors."""
    if coef.device.type == "cuda":
        torch._assert_async(torch.isfinite(coef).all(), "petal_linear: alpha contains non-finite values")
    elif detect_fake_mode() is None:
        value_check(torch.isfinite(coef).all(), "petal_linear: alpha contains non-finite values")


def forward_body(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_cat: Tensor, b_cat: Tensor, coef: Tensor,
                 p: float, seed: Tensor, validate: bool = False, wrap=_launchable) -> tuple[Tensor, Tensor]:
    """The forward operator's body; eager inference calls it directly with ``wrap`` = the identity
    (no dispatcher, no wrap_triton)."""
    if validate:
        _check_coef(coef)
    if x.shape[0] == 0:  # no kernel is launched on an empty batch
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, a_cat.shape[0]))
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731  (the kernels take dense row-major inputs)
    return _kernels().forward(c(x), c(weight), c(bias), c(a_cat), c(b_cat), c(coef), p, seed, wrap=wrap)


@triton_op(NAME, mutates_args=())
def triton_petal_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_cat: Tensor, b_cat: Tensor,
                        coef: Tensor, p: float, seed: Tensor, validate: bool = False) -> tuple[Tensor, Tensor]:
    return forward_body(x, weight, bias, a_cat, b_cat, coef, p, seed, validate)


@triton_op(NAME + "_backward", mutates_args=())
def triton_petal_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, a_cat: Tensor, b_cat: Tensor, coef: Tensor,
                                 u: Tensor, p: float, seed: Tensor, need_x: bool,
                                 need_coef: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if x.shape[0] == 0:
        return (x.new_empty(x.shape) if need_x else _empty(x), a_cat.new_zeros(a_cat.shape),
                b_cat.new_zeros(b_cat.shape), coef.new_zeros(coef.shape) if need_coef else _empty(coef))
    dy, x, weight, a_cat, b_cat, coef, u = (t.contiguous() for t in (dy, x, weight, a_cat, b_cat, coef, u))
    dx, da, db = _kernels().backward(dy, x, weight, a_cat, b_cat, coef, u, p, seed, need_x, wrap=_launchable)
    dc = coef_grad(dy, u, b_cat, coef, p, seed) if need_coef else _empty(coef)
    return (dx if need_x else _empty(x)), da, db, dc


register_petal_autograd(triton_petal_linear, triton_petal_linear_backward)
