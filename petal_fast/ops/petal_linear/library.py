"""PetalLinear as PyTorch operators (``torch.library``) and as an eager ``autograd.Function``.

    petal_fast::fused_petal_linear(x, W, b?, A, B, α?, s, p, seed, stream, backend, validate) -> (y, U)
        y = b + x Wᵀ + Σ_k D_k((c_k ⊙ U_k) B_kᵀ),  U = x A_catᵀ (M × R, unscaled),
        c = [s(1 − α_i), s·α_i] per row (one branch: c = s)
    petal_fast::fused_petal_linear_backward(dy, x, W, A, B, α?, U, s, p, seed, stream,
                                            need_x, need_alpha, need_weight, need_bias, backend)
        -> (dX | empty, dA, dB, dα | empty, dW | empty, db | empty)
        dU = D(dy) B_cat, dT = c ⊙ dU, dA = dTᵀ x, dB = D(dy)ᵀ (c ⊙ U), dX = dy W + dT A_cat,
        dα_i = s·Σ_{rows of i} (⟨dU_hr, U_hr⟩ − ⟨dU_lr, U_lr⟩),  dW = dyᵀ x,  db = Σ_rows dy

``A`` (branches × r × in) and ``B`` (branches × out × r) are the layer's parameters as they are; the
gradients come back in their layout. α enters as itself: the branch weights are computed by each
backend (inside the Triton kernels and the C++ ops; in the torch composition), so a call launches no
kernel to build them. ``seed`` is a 1-element int64 tensor on x's device (read by the kernels on the
device: no host synchronisation) and ``stream`` the layer's stream (petal_fast.definitions.dropout).
``validate``: check α's finiteness inside the operator (how a traced graph checks it).

Two routes run the same bodies (``forward_impl`` / ``backward_impl``):

- eager calls go through :class:`EagerPetalLinear`, a plain ``torch.autograd.Function``: no
  dispatcher, no schema parsing (host time the custom-op route spends on every call);
- ``torch.compile`` / ``torch.export`` see the operators (this module's opaque pair, or the Triton
  ``triton_op`` pair in :mod:`.triton_library`), with fake implementations and registered
  autograd.

Saved for backward: x, W, A, B, α, U and the seed — never an M × out tensor. W and b get gradients
only when they require them (dW = dyᵀx and db by torch on every backend). Double backward raises.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from petal_fast import _ext
from petal_fast.definitions.dropout import dropout_mask

from .._graph import value_check, wrap_kwargs
from .backends import host_seed, implementation, triton_design

OP = "petal_linear"
NAME = "petal_fast::fused_petal_linear"


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 alpha: Optional[Tensor], scale: float, p: float, seed: Tensor, stream: int, backend: str,
                 validate: bool = False, wrap=None, design: str | None = None) -> tuple[Tensor, Tensor]:
    """(y, U) on ``backend``; ``wrap``: a triton_op's kernel wrapper (``torch.library.wrap_triton``);
    ``design``: the Triton design (None: this thread's)."""
    if validate and alpha is not None:
        value_check(torch.isfinite(alpha).all(), "petal_linear: alpha contains non-finite values")
    branches, r = lora_A.shape[:2]
    if x.shape[0] == 0:  # no kernel is launched on an empty batch
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, branches * r))
    forward, _ = implementation(backend)
    # the backends take x row-major (a no-op for what the dispatcher passes)
    extra = {"design": design} if design is not None else {}
    return forward(x.contiguous(), weight, bias, lora_A, lora_B, alpha, scale, p, seed, stream, **wrap_kwargs(wrap),
                   **extra)


def alpha_grad(dy: Tensor, u: Tensor, lora_B: Tensor, alpha: Tensor, scale: float, p: float, seed: Tensor,
               stream: int) -> Tensor:
    """dα_i = s·Σ_{rows m of image i} (⟨D_hr(dy)_m B_hr, U_hr,m⟩ − ⟨D_lr(dy)_m B_lr, U_lr,m⟩), accumulated
    in fp32 (fp64 for fp64 inputs); masks from the same (seed, stream) as the forward."""
    images, r = alpha.shape[0], lora_B.shape[2]
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    s = host_seed(seed, stream)
    part = []
    for k in range(2):
        dyk = dy if p == 0.0 else dy * dropout_mask(s, k, dy.shape[0], dy.shape[1], p, dtype=dy.dtype,
                                                   device=dy.device)
        du = (dyk @ lora_B[k]).to(acc)
        part.append((du * u[:, k * r:(k + 1) * r].to(acc)).view(images, -1).sum(1))
    return (scale * (part[1] - part[0])).to(alpha.dtype)


def backward_impl(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, alpha: Optional[Tensor],
                  u: Tensor, scale: float, p: float, seed: Tensor, stream: int, need_x: bool, need_alpha: bool,
                  need_weight: bool, need_bias: bool, backend: str,
                  wrap=None, design: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dX | empty, dA, dB, dα | empty, dW | empty, db | empty) on ``backend``; ``design`` as in forward_impl."""
    dw = (dy.T @ x).to(weight.dtype) if need_weight else _empty(weight)
    dbias = dy.sum(0).to(weight.dtype) if need_bias else _empty(weight)
    if x.shape[0] == 0:
        return (x.new_empty(x.shape) if need_x else _empty(x), torch.zeros_like(lora_A),
                torch.zeros_like(lora_B), torch.zeros_like(alpha) if need_alpha else _empty(x), dw, dbias)
    dy, x, u = dy.contiguous(), x.contiguous(), u.contiguous()
    _, backward = implementation(backend)
    extra = {"design": design} if design is not None else {}
    dx, da, db = backward(dy, x, weight, lora_A, lora_B, alpha, u, scale, p, seed, stream, need_x, **wrap_kwargs(wrap),
                          **extra)
    dalpha = alpha_grad(dy, u, lora_B, alpha, scale, p, seed, stream) if need_alpha else _empty(x)
    return (dx if need_x else _empty(x)), da, db, dalpha, dw, dbias


# -- the eager route ---------------------------------------------------------------------------------
class EagerPetalLinear(torch.autograd.Function):
    """The eager route: the operator bodies behind a plain autograd node (same numbers, same masks)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, alpha, scale, p, seed, stream, backend):
        # this thread's Triton design, kept for the backward (autograd may run it on another thread)
        design = triton_design() if backend == "triton" else None
        y, u = forward_impl(x, weight, bias, lora_A, lora_B, alpha, scale, p, seed, stream, backend, design=design)
        ctx.save_for_backward(x, weight, lora_A, lora_B, alpha, u, seed)
        ctx.args = (scale, p, stream, backend, design)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, alpha, u, seed = ctx.saved_tensors
        scale, p, stream, backend, design = ctx.args
        need = ctx.needs_input_grad
        create_graph = torch.is_grad_enabled()
        with torch.no_grad():
            grads = backward_impl(dy.contiguous(), x, weight, lora_A, lora_B, alpha, u, scale, p, seed, stream,
                                  need[0], need[5], need[1], need[2], backend, design=design)
        if create_graph:  # the gradients are not differentiable: fail when they are differentiated
            grads = _NoDoubleBackward.apply(len(grads), *grads, x, weight, lora_A, lora_B, alpha)
        dx, da, db, dalpha, dw, dbias = grads
        return (dx if need[0] else None, dw if need[1] else None, dbias if need[2] else None,
                da if need[3] else None, db if need[4] else None, dalpha if need[5] else None,
                None, None, None, None, None)


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the gradients of a create_graph backward whose own backward raises the op's message."""

    @staticmethod
    def forward(ctx, n, *tensors):  # the inputs after the n gradients tie them to the graph
        return tuple(g.clone() for g in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx)


# -- the operators (what torch.compile and torch.export see) -----------------------------------------
@torch.library.custom_op(NAME, mutates_args=())
def fused_petal_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       alpha: Optional[Tensor], scale: float, p: float, seed: Tensor, stream: int, backend: str,
                       validate: bool = False) -> tuple[Tensor, Tensor]:
    return forward_impl(x, weight, bias, lora_A, lora_B, alpha, scale, p, seed, stream, backend, validate)


def fake_forward(x, weight, bias, lora_A, lora_B, alpha, *rest):
    m = x.shape[0]
    return x.new_empty((m, weight.shape[0])), x.new_empty((m, lora_A.shape[0] * lora_A.shape[1]))


fused_petal_linear.register_fake(fake_forward)


@torch.library.custom_op(NAME + "_backward", mutates_args=())
def fused_petal_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                alpha: Optional[Tensor], u: Tensor, scale: float, p: float, seed: Tensor,
                                stream: int, need_x: bool, need_alpha: bool, need_weight: bool, need_bias: bool,
                                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward_impl(dy, x, weight, lora_A, lora_B, alpha, u, scale, p, seed, stream, need_x, need_alpha,
                         need_weight, need_bias, backend)


def fake_backward(dy, x, weight, lora_A, lora_B, alpha, u, scale, p, seed, stream, need_x, need_alpha,
                  need_weight, need_bias, *rest):
    # contiguous, whatever the inputs' layouts (new_empty, not empty_like: the real ones are row-major)
    return (x.new_empty(x.shape) if need_x else _empty(x), lora_A.new_empty(lora_A.shape),
            lora_B.new_empty(lora_B.shape), alpha.new_empty(alpha.shape) if need_alpha else _empty(x),
            weight.new_empty(weight.shape) if need_weight else _empty(weight),
            weight.new_empty(weight.shape[:1]) if need_bias else _empty(weight))


fused_petal_linear_backward.register_fake(fake_backward)


def register_petal_linear_autograd(forward_op, backward_op) -> None:
    """Make ``backward_op`` the gradient of ``forward_op`` (this module's operator pair, or the Triton
    one): forward inputs (x, W, b, A, B, α, s, p, seed, stream, *extra, validate), backward inputs
    (dy, x, W, A, B, α, U, s, p, seed, stream, need_x, need_alpha, need_weight, need_bias, *extra)."""
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _bias, lora_A, lora_B, alpha, scale, p, seed, stream = inputs[:10]
        ctx.save_for_backward(x, weight, lora_A, lora_B, alpha, output[1], seed)
        ctx.args, ctx.extra, ctx.n_inputs = (scale, p, stream), tuple(inputs[10:-1]), len(inputs)
        ctx.set_materialize_grads(False)  # U's gradient is never used: no zero-filled M × R tensor

    def backward(ctx, dy: Tensor, du: Tensor):
        x, weight, lora_A, lora_B, alpha, u, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        scale, p, stream = ctx.args
        dx, da, db, dalpha, dw, dbias = backward_op(dy.contiguous(), x, weight, lora_A, lora_B, alpha, u, scale, p,
                                                    seed, stream, need[0], need[5], need[1], need[2], *ctx.extra)
        grads = (dx if need[0] else None, dw if need[1] else None, dbias if need[2] else None,
                 da if need[3] else None, db if need[4] else None, dalpha if need[5] else None)
        return grads + (None,) * (ctx.n_inputs - len(grads))

    forward_op.register_autograd(backward, setup_context=setup_context)
    backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "petal_linear: double backward is not supported — the gradients of the fused op were computed with "
        "create_graph=True and are now being differentiated again. Use the reference backend "
        "(petal_fast.use_backend('reference')) for higher-order gradients.")


register_petal_linear_autograd(fused_petal_linear, fused_petal_linear_backward)


# -- the raw C++ kernels: fake implementations so they trace when called directly -----------------------
@_ext.when_loaded
def _raw_kernel_fakes() -> None:
    """Fake implementations of the raw C++ kernels, so they trace when called directly."""
    if not _ext.has_op(OP):
        return

    @torch.library.register_fake("petal_fast::petal_linear_fwd")
    def _(x, weight, bias, lora_A, lora_B, alpha, scale, p, seed):
        rank = lora_A.shape[0] * lora_A.shape[1]
        return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], rank))

    @torch.library.register_fake("petal_fast::petal_linear_bwd")
    def _(dy, x, weight, lora_A, lora_B, alpha, scale, u, p, seed, need_x):
        return (x.new_empty(x.shape) if need_x else x.new_empty(0), lora_A.new_empty(lora_A.shape),
                lora_B.new_empty(lora_B.shape))
