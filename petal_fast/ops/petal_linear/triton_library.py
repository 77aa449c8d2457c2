"""PetalLinear's Triton backend as ``torch.library.triton_op`` operators: torch.compile sees the kernels.

    petal_fast::triton_petal_linear(x, W, b?, A, B, α?, s, p, seed, stream, validate) -> (y, U)
    petal_fast::triton_petal_linear_backward(dy, x, W, A, B, α?, U, s, p, seed, stream,
                                             need_x, need_alpha, need_weight, need_bias)
        -> (dX | empty, dA, dB, dα | empty, dW | empty, db | empty)

Same formulas, outputs and rules as ``petal_fast::fused_petal_linear`` (:mod:`.library`:
empty batch, dα, dW, double backward). The difference is what a compiler sees. These bodies are made
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
``fused_petal_linear`` instead (:mod:`.dispatch` chooses).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor
from torch.library import triton_op

from .._graph import launchable as _launchable
from .library import backward_impl, forward_impl, register_petal_linear_autograd

NAME = "petal_fast::triton_petal_linear"


@triton_op(NAME, mutates_args=())
def triton_petal_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                        alpha: Optional[Tensor], scale: float, p: float, seed: Tensor, stream: int,
                        validate: bool = False) -> tuple[Tensor, Tensor]:
    return forward_impl(x, weight, bias, lora_A, lora_B, alpha, scale, p, seed, stream, "triton", validate,
                        wrap=_launchable)


@triton_op(NAME + "_backward", mutates_args=())
def triton_petal_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                 alpha: Optional[Tensor], u: Tensor, scale: float, p: float, seed: Tensor,
                                 stream: int, need_x: bool, need_alpha: bool, need_weight: bool,
                                 need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward_impl(dy, x, weight, lora_A, lora_B, alpha, u, scale, p, seed, stream, need_x, need_alpha,
                         need_weight, need_bias, "triton", wrap=_launchable)


register_petal_linear_autograd(triton_petal_linear, triton_petal_linear_backward)
