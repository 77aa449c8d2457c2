"""The margin-softmax core's Triton backend as ``torch.library.triton_op`` operators (torch.compile sees the kernels).

    petal_fast::triton_margin_loss(e, w, labels, scale, validate) -> (lse, zsum, cos_t)
    petal_fast::triton_margin_loss_backward(e, w, labels, lse, g_lse, g_zsum, g_cos, scale, need_e, need_w)
        -> (dE | empty, dW | empty)

Same bodies as ``petal_fast::fused_margin_loss`` (:mod:`.library`: formulas, empty batch, the
target path, value checks, double backward), with the kernels launched through ``wrap_triton``:
under torch.compile AOTAutograd decomposes the operator and Inductor schedules the three kernels
(``_fwd_kernel``, ``_bwd_de_kernel``, ``_bwd_dw_kernel``) and the torch code around them (norms,
the merge of the class splits' partials, the target path) as one graph. The interpreter caveat of
``ops/_graph.launchable`` applies (a graph compiled under it uses the opaque operator).
"""
from __future__ import annotations

from torch import Tensor
from torch.library import triton_op

from .._graph import launchable
from .library import backward_impl, forward_impl, register_margin_loss_autograd

NAME = "petal_fast::triton_margin_loss"


@triton_op(NAME, mutates_args=())
def triton_margin_loss(e: Tensor, w: Tensor, labels: Tensor, scale: float,
                       validate: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return forward_impl(e, w, labels, scale, "triton", validate, wrap=launchable)


@triton_op(NAME + "_backward", mutates_args=())
def triton_margin_loss_backward(e: Tensor, w: Tensor, labels: Tensor, lse: Tensor, g_lse: Tensor, g_zsum: Tensor,
                                g_cos: Tensor, scale: float, need_e: bool, need_w: bool) -> tuple[Tensor, Tensor]:
    return backward_impl(e, w, labels, lse, g_lse, g_zsum, g_cos, scale, need_e, need_w, "triton",
                              wrap=launchable)


register_margin_loss_autograd(triton_margin_loss, triton_margin_loss_backward)
