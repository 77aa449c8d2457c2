"""PetalLinear as PyTorch operators (``torch.library``): what ``torch.compile`` and ``torch.export`` see.

    petal_fast::fused_petal_linear(x, W, b?, A_cat, B_cat, coef, p, seed, backend, validate) -> (y, U)
        y = b + x Wᵀ + Σ_k D_k((coef[:, k] ⊙ U_k) B_kᵀ),   U = x A_catᵀ  (M × R, unscaled)
    petal_fast::fused_petal_linear_backward(dy, x, W, A_cat, B_cat, coef, U, p, seed, need_x, need_coef, backend)
        -> (dX | empty, dA_cat, dB_cat, dcoef | empty)
        dcoef[i, k] = Σ_{rows m of image i} ⟨D_k(dy)_m B_k, U_k,m⟩   (only when coef needs a gradient)

One operator pair for every non-reference backend (``backend``: "torch" | "cpp" | "triton", a
string argument: a constant in a traced graph). ``validate``: check that ``coef`` (α's branch
weights) is finite inside the operator — how a traced graph checks α (see ``_graph.value_check``). Each has a fake implementation that allocates exactly
what the real one returns, and ``register_autograd`` makes the backward op the forward's gradient.
The seed is a 1-element int64 CPU tensor (read on the host inside the op: no device sync).

- Zero rows (M = 0): empty outputs and zero gradients without launching any backend kernel.
- Gradient of ``coef`` (so of α, through ``branch_coefficients``): computed on every backend by the
  same torch code inside the backward op, only when asked for (an extra dY·B_cat pass).
- Double backward (differentiating the gradients again): a clear RuntimeError on every backend.

The raw C++ kernels (``petal_fast::petal_linear_fwd`` / ``_bwd``, registered by ``csrc/``) get fake
implementations here too, so they trace as well when called directly.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from petal_fast import _ext
from petal_fast.backend import implementation
from petal_fast.definitions.dropout import dropout_mask

from . import _petal_linear_torch as torch_impl
from ._graph import value_check, wrap_kwargs

OP = "petal_linear"
NAME = "petal_fast::fused_petal_linear"


def _impl(backend: str):
    return implementation(backend, OP, torch_impl)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _seed_arg(seed: Tensor, backend: str):
    """The seed as the backend takes it: Triton kernels read the tensor on the device (nothing read on
    the host: traceable), the C++ and torch backends an int."""
    return seed if backend == "triton" else int(seed.item())


def forward_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_cat: Tensor, b_cat: Tensor,
                 coef: Tensor, p: float, seed: Tensor, backend: str, validate: bool = False,
                 wrap=None) -> tuple[Tensor, Tensor]:
    """The operator's body (of the Triton triton_op too, with ``wrap`` = its kernel wrapper); eager
    inference calls it directly (the dispatcher costs ~35 µs a call)."""
    if validate:
        value_check(torch.isfinite(coef).all(), "petal_linear: alpha contains non-finite values")
    if x.shape[0] == 0:  # no kernel is launched on an empty batch
        return x.new_empty((0, weight.shape[0])), x.new_empty((0, a_cat.shape[0]))
    fwd, _ = _impl(backend)
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731  (the kernels take dense row-major inputs)
    return fwd(c(x), c(weight), c(bias), c(a_cat), c(b_cat), c(coef), float(p), _seed_arg(seed, backend),
               **wrap_kwargs(wrap))


@torch.library.custom_op(NAME, mutates_args=())
def fused_petal_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], a_cat: Tensor, b_cat: Tensor,
                       coef: Tensor, p: float, seed: Tensor, backend: str,
                       validate: bool = False) -> tuple[Tensor, Tensor]:
    return forward_impl(x, weight, bias, a_cat, b_cat, coef, p, seed, backend, validate)


@fused_petal_linear.register_fake
def _(x, weight, bias, a_cat, b_cat, coef, p, seed, backend, validate=False):
    m = x.shape[0]
    return x.new_empty((m, weight.shape[0])), x.new_empty((m, a_cat.shape[0]))


def coef_grad(dy: Tensor, u: Tensor, b_cat: Tensor, coef: Tensor, p: float, seed: int | Tensor) -> Tensor:
    """dcoef (images × branches) = Σ over each image's rows of ⟨D_k(dy) B_k, U_k⟩, accumulated in fp32/fp64."""
    images, branches = coef.shape
    r = b_cat.shape[1] // branches
    acc = torch.float64 if coef.dtype == torch.float64 else torch.float32
    parts = []
    for k in range(branches):
        sl = slice(k * r, (k + 1) * r)
        dyk = dy if p == 0.0 else dy * dropout_mask(seed, k, dy.shape[0], dy.shape[1], p, dtype=dy.dtype,
                                                   device=dy.device)
        du = (dyk @ b_cat[:, sl]).to(acc)
        parts.append((du * u[:, sl].to(acc)).view(images, -1).sum(1))
    return torch.stack(parts, dim=1).to(coef.dtype)


def backward_impl(dy: Tensor, x: Tensor, weight: Tensor, a_cat: Tensor, b_cat: Tensor, coef: Tensor, u: Tensor,
                  p: float, seed: Tensor, need_x: bool, need_coef: bool, backend: str,
                  wrap=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward operator's body (of the Triton triton_op too, with ``wrap``)."""
    if x.shape[0] == 0:
        return (x.new_empty(x.shape) if need_x else _empty(x), a_cat.new_zeros(a_cat.shape),
                b_cat.new_zeros(b_cat.shape), coef.new_zeros(coef.shape) if need_coef else _empty(coef))
    _, bwd = _impl(backend)
    dy, x, weight, a_cat, b_cat, coef, u = (t.contiguous() for t in (dy, x, weight, a_cat, b_cat, coef, u))
    s = _seed_arg(seed, backend)
    dx, da, db = bwd(dy, x, weight, a_cat, b_cat, coef, u, float(p), s, need_x, **wrap_kwargs(wrap))
    dc = coef_grad(dy, u, b_cat, coef, float(p), s) if need_coef else _empty(coef)
    return (dx if need_x else _empty(x)), da.contiguous(), db.contiguous(), dc


@torch.library.custom_op(NAME + "_backward", mutates_args=())
def fused_petal_linear_backward(dy: Tensor, x: Tensor, weight: Tensor, a_cat: Tensor, b_cat: Tensor, coef: Tensor,
                                u: Tensor, p: float, seed: Tensor, need_x: bool, need_coef: bool,
                                backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return backward_impl(dy, x, weight, a_cat, b_cat, coef, u, p, seed, need_x, need_coef, backend)


@fused_petal_linear_backward.register_fake
def _(dy, x, weight, a_cat, b_cat, coef, u, p, seed, need_x, need_coef, backend):
    # contiguous, whatever the inputs' layouts (new_empty, not empty_like: the real ones are row-major)
    return (x.new_empty(x.shape) if need_x else _empty(x), a_cat.new_empty(a_cat.shape), b_cat.new_empty(b_cat.shape),
            coef.new_empty(coef.shape) if need_coef else _empty(coef))


def register_petal_autograd(forward_op, backward_op) -> None:
    """Make ``backward_op`` the gradient of ``forward_op`` (this module's operator pair, or the Triton
    one): forward inputs (x, W, b, A_cat, B_cat, coef, p, seed, *extra, validate), backward inputs
    (dy, x, W, A_cat, B_cat, coef, U, p, seed, need_x, need_coef, *extra); saved: x, W, A_cat, B_cat,
    coef, U and the seed — never an M×out tensor."""
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _bias, a_cat, b_cat, coef, p, seed = inputs[:8]
        ctx.save_for_backward(x, weight, a_cat, b_cat, coef, output[1], seed)
        ctx.p, ctx.extra, ctx.n_inputs = p, tuple(inputs[8:-1]), len(inputs)

    def backward(ctx, dy: Tensor, du: Tensor):
        x, weight, a_cat, b_cat, coef, u, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, da, db, dc = backward_op(dy.contiguous(), x, weight, a_cat, b_cat, coef, u, ctx.p, seed,
                                     need[0], need[5], *ctx.extra)
        grads = (dx if need[0] else None, None, None, da if need[3] else None, db if need[4] else None,
                 dc if need[5] else None)
        return grads + (None,) * (ctx.n_inputs - len(grads))

    forward_op.register_autograd(backward, setup_context=setup_context)
    backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "petal_linear: double backward is not supported — the gradients of the fused op were computed with "
        "create_graph=True and are now being differentiated again. Use the reference backend "
        "(petal_fast.use_backend('reference')) for higher-order gradients.")


register_petal_autograd(fused_petal_linear, fused_petal_linear_backward)


# -- the raw C++ kernels: fake implementations so they trace when called directly -----------------------
@_ext.when_loaded
def _raw_kernel_fakes() -> None:
    """Fake implementations of the raw C++ kernels, so they trace when called directly."""
    if not _ext.has_op(OP):
        return

    @torch.library.register_fake("petal_fast::petal_linear_fwd")
    def _(x, weight, bias, a_cat, b_cat, coef, p, seed):
        return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], a_cat.shape[0]))

    @torch.library.register_fake("petal_fast::petal_linear_bwd")
    def _(dy, x, weight, a_cat, b_cat, coef, u, p, seed, need_x):
        return (x.new_empty(x.shape) if need_x else x.new_empty(0), a_cat.new_empty(a_cat.shape),
                b_cat.new_empty(b_cat.shape))
