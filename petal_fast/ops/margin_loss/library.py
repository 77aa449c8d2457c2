"""The fused margin-softmax core as PyTorch operators (``torch.library``).

    petal_fast::fused_margin_loss(e, w, labels, scale, backend, validate) -> (lse, zsum, cos_t)
        lse_i  = log Σ_{j≠y_i} exp(s·cos θ_ij),   zsum_i = Σ_{j≠y_i} s·cos θ_ij,   cos_t_i = ⟨ê_i, ŵ_{y_i}⟩
    petal_fast::fused_margin_loss_backward(e, w, labels, lse, g_lse, g_zsum, g_cos, scale, need_e, need_w, backend)
        -> (dE | empty, dW | empty)

``backend``: "torch" | "cpp" | "triton" (a constant in a traced graph). ``validate``: check inside
the operator that labels are in [0, C) and embeddings finite (how a traced graph checks values). ``labels`` outside [0, C)
exclude nothing and give cos_t = 0 (rows whose target class lives on another rank). The target
path's dW is added into the rows of the fused dW in place (never a second C×D gradient). Fake
implementations allocate what the real ones return; ``register_autograd`` wires the backward op;
double backward raises. An empty batch (B = 0) launches no kernel: empty statistics, dW = 0.
"""
from __future__ import annotations

import torch
from torch import Tensor

from petal_fast import _ext
from petal_fast.definitions.margin_loss import NORM_EPS

from .._graph import value_check, wrap_kwargs
from . import torch_impl
from .backends import implementation

OP = "margin_loss"
NAME = "petal_fast::fused_margin_loss"


def _target(e: Tensor, w: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(owned mask, target rows, e and ŵ_y rows in the accumulation dtype, their inverse norms)."""
    owned = (labels >= 0) & (labels < w.shape[0])
    rows = labels.clamp(0, w.shape[0] - 1)
    acc = torch_impl.acc_dtype(e.dtype)
    e_acc, w_t = e.to(acc), w.index_select(0, rows).to(acc)
    return owned, rows, e_acc, w_t, torch_impl.inv_norm(e_acc, NORM_EPS), torch_impl.inv_norm(w_t, NORM_EPS)


def forward_impl(e: Tensor, w: Tensor, labels: Tensor, scale: float, backend: str, validate: bool = False,
              wrap=None) -> tuple[Tensor, Tensor, Tensor]:
    """The forward operator's body (of the Triton triton_op too, with ``wrap`` = its kernel wrapper)."""
    if validate:
        value_check(((labels >= 0) & (labels < w.shape[0])).all(), f"labels must be in [0, num_classes={w.shape[0]})")
        value_check(torch.isfinite(e).all(), "embeddings contain non-finite values (NaN or inf)")
    acc = torch_impl.acc_dtype(e.dtype)
    if e.shape[0] == 0:
        return tuple(e.new_empty(0, dtype=acc) for _ in range(3))
    fwd, _ = implementation(backend)
    e, w, labels = e.contiguous(), w.contiguous(), labels.contiguous()  # the kernels take dense row-major inputs
    with torch.autocast(e.device.type, enabled=False):  # the op sets its own precision (fp32 accumulation)
        lse, zsum = fwd(e, w, labels, float(scale), NORM_EPS, **wrap_kwargs(wrap))
        owned, _, e_acc, w_t, re, rw = _target(e, w, labels)
        cos_t = ((e_acc * re.unsqueeze(1)) * (w_t * rw.unsqueeze(1))).sum(1) * owned
    return lse.to(acc), zsum.to(acc), cos_t


def backward_impl(e: Tensor, w: Tensor, labels: Tensor, lse: Tensor, g_lse: Tensor, g_zsum: Tensor,
                       g_cos: Tensor, scale: float, need_e: bool, need_w: bool, backend: str,
                       wrap=None) -> tuple[Tensor, Tensor]:
    """The backward operator's body (of the Triton triton_op too, with ``wrap``)."""
    if e.shape[0] == 0:
        return (e.new_empty(e.shape) if need_e else e.new_empty(0)), (w.new_zeros(w.shape) if need_w else w.new_empty(0))
    _, bwd = implementation(backend)
    e, w, labels, lse, g_lse, g_zsum, g_cos = (t.contiguous() for t in (e, w, labels, lse, g_lse, g_zsum, g_cos))
    with torch.autocast(e.device.type, enabled=False):  # a backward called inside autocast: same precision
        de, dw = bwd(e, w, labels, lse, g_lse, g_zsum, float(scale), NORM_EPS, need_e, need_w,
                     **wrap_kwargs(wrap))
        owned, rows, e_acc, w_t, re, rw = _target(e, w, labels)  # target path: cos = ⟨ê, ŵ_y⟩ on B rows
        g = (g_cos.to(e_acc.dtype) * owned).unsqueeze(1)
        if need_e:
            de_t = torch_impl.normalise_grad(g * w_t * rw.unsqueeze(1), e_acc, re, NORM_EPS)
            de = (de.to(e_acc.dtype) + de_t).to(e.dtype)
        if need_w:
            dw_t = torch_impl.normalise_grad(g * e_acc * re.unsqueeze(1), w_t, rw, NORM_EPS)
            # CPU: index_put_ adds in index order on one thread; index_add_ opens a parallel region even for
            # B rows (docs/design.md §3.6). CUDA: index_add_'s atomics
            if dw.device.type == "cpu":
                dw = dw.index_put_((rows,), dw_t.to(dw.dtype), accumulate=True)
            else:
                dw = dw.index_add_(0, rows, dw_t.to(dw.dtype))
        return (de if need_e else e.new_empty(0)), (dw if need_w else w.new_empty(0))


@torch.library.custom_op(NAME, mutates_args=())
def fused_margin_loss(e: Tensor, w: Tensor, labels: Tensor, scale: float, backend: str,
                      validate: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    return forward_impl(e, w, labels, scale, backend, validate)


@fused_margin_loss.register_fake
def _(e, w, labels, scale, backend, validate=False):
    acc = torch_impl.acc_dtype(e.dtype)
    return tuple(e.new_empty(e.shape[0], dtype=acc) for _ in range(3))


@torch.library.custom_op(NAME + "_backward", mutates_args=())
def fused_margin_loss_backward(e: Tensor, w: Tensor, labels: Tensor, lse: Tensor, g_lse: Tensor, g_zsum: Tensor,
                               g_cos: Tensor, scale: float, need_e: bool, need_w: bool,
                               backend: str) -> tuple[Tensor, Tensor]:
    return backward_impl(e, w, labels, lse, g_lse, g_zsum, g_cos, scale, need_e, need_w, backend)


@fused_margin_loss_backward.register_fake
def _(e, w, labels, lse, g_lse, g_zsum, g_cos, scale, need_e, need_w, backend):
    return (e.new_empty(e.shape) if need_e else e.new_empty(0)), (w.new_empty(w.shape) if need_w else w.new_empty(0))


def register_margin_loss_autograd(forward_op, backward_op) -> None:
    """Make ``backward_op`` the gradient of ``forward_op`` (this module's operator pair, or the Triton
    one): forward inputs (e, w, labels, scale, *extra, validate), backward inputs (e, w, labels, lse,
    g_lse, g_zsum, g_cos, scale, need_e, need_w, *extra); saved: e, w, labels and lse (B values)."""
    def setup_context(ctx, inputs, output) -> None:
        e, w, labels, scale = inputs[:4]
        ctx.save_for_backward(e, w, labels, output[0])
        ctx.scale, ctx.extra, ctx.n_inputs = scale, tuple(inputs[4:-1]), len(inputs)

    def backward(ctx, g_lse, g_zsum, g_cos):
        e, w, labels, lse = ctx.saved_tensors
        zero = lambda g: torch.zeros_like(lse) if g is None else g.contiguous()  # noqa: E731
        need_e, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        de, dw = backward_op(e, w, labels, lse, zero(g_lse), zero(g_zsum), zero(g_cos), ctx.scale,
                             need_e, need_w, *ctx.extra)
        return (de if need_e else None, dw if need_w else None) + (None,) * (ctx.n_inputs - 2)

    forward_op.register_autograd(backward, setup_context=setup_context)
    backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("margin_loss: double backward is not supported by the fused core; use the "
                       "reference backend (petal_fast.use_backend('reference')) for higher-order gradients.")


register_margin_loss_autograd(fused_margin_loss, fused_margin_loss_backward)


class EagerMarginLoss(torch.autograd.Function):
    """The operator pair above without ``torch.library`` dispatch, for eager calls (``ops/_eager.py``):
    the same bodies, the same saved tensors, the same double-backward error. Any backend, Triton
    included (its kernels launched directly, as a triton_op body does outside a trace)."""

    @staticmethod
    def forward(ctx, e: Tensor, w: Tensor, labels: Tensor, scale: float, backend: str):
        lse, zsum, cos_t = forward_impl(e, w, labels, scale, backend)
        ctx.save_for_backward(e, w, labels, lse)
        ctx.scale, ctx.backend = scale, backend
        return lse, zsum, cos_t

    @staticmethod
    def backward(ctx, g_lse, g_zsum, g_cos):
        e, w, labels, lse = ctx.saved_tensors
        need_e, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        de, dw = EagerMarginLossBackward.apply(e, w, labels, lse, g_lse.contiguous(), g_zsum.contiguous(),
                                         g_cos.contiguous(), ctx.scale, need_e, need_w, ctx.backend)
        return (de if need_e else None), (dw if need_w else None), None, None, None


class EagerMarginLossBackward(torch.autograd.Function):
    """``fused_margin_loss_backward`` for :class:`EagerMarginLoss`; differentiating it raises, as the operator's does."""

    @staticmethod
    def forward(ctx, *args):
        return backward_impl(*args)

    @staticmethod
    def backward(ctx, *grads):
        return _no_double_backward(ctx, *grads)


@_ext.when_loaded
def _raw_kernel_fakes() -> None:
    """Fake implementations of the raw C++ kernels, so they trace when called directly."""
    if not _ext.has_op(OP):
        return

    @torch.library.register_fake("petal_fast::margin_loss_fwd")
    def _(e, w, labels, scale, eps):
        acc = torch_impl.acc_dtype(e.dtype)
        return e.new_empty(e.shape[0], dtype=acc), e.new_empty(e.shape[0], dtype=acc)
