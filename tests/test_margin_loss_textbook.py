"""Every margin variant against its textbook formula, written out here and nowhere else.

The other margin tests compare the fused backends with ``petal_fast.reference``; this file checks
the oracle and every backend, through the public API, against the papers' formulas, so that a
wrong margin in the oracle cannot pass as right:

    CosFace   s·(cos θ − m)                          m = 0.4
    ArcFace   s·cos(θ + m)                           m = 0.5
    combined  s·(cos(m1·θ + m2) − m3)                (m1, m2, m3) = (0.9, 0.3, 0.15)
    AdaFace   s·(cos(θ + g_angle) − g_add),  g_angle = −m·ẑ,  g_add = m·ẑ + m,   m = 0.4
              ẑ = clip((‖e‖ − μ) / (σ / h), −1, 1)    (AdaFace paper, eq. for ẑ; the AdaFace code
              and petal_fast divide by σ + 10⁻³, written so here)

on the target column of s·cos θ_ij, followed by softmax cross entropy. ``straight_through`` is
the margin applied without gradient: the target logit's gradient is that of s·cos θ.
"""
from __future__ import annotations

import math

import pytest
import torch

import petal_fast
from petal_fast import _ext
from petal_fast.definitions.margin_loss import resolve_margins
from petal_fast.ops.margin_loss.per_row import adaface_zhat, target_logit
from petal_fast.nn.margin_loss import MarginSoftmaxLoss
from petal_fast.ops.margin_loss import margin_loss

from conftest import rel_err, triton_interpreter_ok

S = 16.0
M_COS, M_ARC, M_COMBINED, M_ADA, H = 0.4, 0.5, (0.9, 0.3, 0.15), 0.4, 0.333
MU, SIGMA = 6.0, 0.6  # with ‖e‖ ∈ [4, 8]: some ẑ inside (−1, 1), some clipped


def zhat(norms: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    return ((norms - mu) / ((sigma + 1e-3) / H)).clamp(-1.0, 1.0)


def textbook_target(loss: str, cos: torch.Tensor, norms: torch.Tensor, mu: float = MU,
                    sigma: float = SIGMA) -> torch.Tensor:
    theta = torch.acos(cos)
    if loss == "cosface":
        return S * (cos - M_COS)
    if loss == "arcface":
        return S * torch.cos(theta + M_ARC)
    if loss == "combined":
        m1, m2, m3 = M_COMBINED
        return S * (torch.cos(m1 * theta + m2) - m3)
    z = zhat(norms.detach(), mu, sigma)
    g_angle, g_add = -M_ADA * z, M_ADA * z + M_ADA
    return S * (torch.cos(theta + g_angle) - g_add)


def textbook_loss(e: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, loss: str, grad: str,
                  mu: float = MU, sigma: float = SIGMA) -> torch.Tensor:
    """Mean softmax cross entropy over s·cos θ with the textbook target logit."""
    cos = (e / e.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).t()
    rows = torch.arange(e.shape[0])
    cos_t = cos[rows, labels]
    target = textbook_target(loss, cos_t, e.norm(dim=1), mu, sigma)
    if grad == "straight_through":
        target = S * cos_t + (target - S * cos_t).detach()
    onehot = torch.zeros_like(cos, dtype=torch.bool)
    onehot[rows, labels] = True
    logits = torch.where(onehot, target.unsqueeze(1).expand_as(cos), S * cos)
    per_row = torch.logsumexp(logits, dim=1) - target
    return per_row.mean()


def inputs(B: int = 6, C: int = 9, D: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e = torch.randn(B, D, dtype=torch.float64)
    e = e / e.norm(dim=1, keepdim=True) * (4.0 + 4.0 * torch.rand(B, 1, dtype=torch.float64))
    w = torch.randn(C, D, dtype=torch.float64)
    return e, w, torch.randint(0, C, (B,))


MARGINS = {"cosface": None, "arcface": None, "combined": M_COMBINED, "adaface": None}
# the ops' own defaults must be the papers' margins: they are passed explicitly only for combined
BACKENDS = ["reference", "torch",
            pytest.param("cpp", marks=pytest.mark.skipif(not _ext.has_op("margin_loss"), reason="C++ not built")),
            pytest.param("triton", marks=pytest.mark.skipif(not triton_interpreter_ok(),
                                                            reason="needs Triton's interpreter"))]


def grads_of(fn, e: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e, w = e.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(e, w)
    return (loss, *torch.autograd.grad(loss, (e, w)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", ["exact", "straight_through"])
@pytest.mark.parametrize("loss", list(MARGINS))
def test_op_is_the_textbook_formula(backend, loss, grad):
    """petal_fast.ops.margin_loss: loss, dE and dW equal the textbook formula's."""
    e, w, labels = inputs()
    # the Triton kernels compute in float32 (the interpreter has no float64 dot)
    dtype, tol = (torch.float32, 1e-5) if backend == "triton" else (torch.float64, 1e-9)
    e, w = e.to(dtype), w.to(dtype)
    ada = {"norm_mean": MU, "norm_std": SIGMA} if loss == "adaface" else {}

    def op(e, w):
        with petal_fast.use_backend(backend):
            return margin_loss(e, w, labels, loss=loss, margins=MARGINS[loss], scale=S, grad=grad, **ada)
    got = grads_of(op, e, w)
    want = grads_of(lambda e, w: textbook_loss(e, w, labels, loss, grad), e.double(), w.double())
    for name, a, b in zip(("loss", "dE", "dW"), got, want):
        assert rel_err(a, b) < tol, f"{name}: rel err {rel_err(a, b):.3g}"


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("loss", list(MARGINS))
def test_module_is_the_textbook_formula(backend, loss):
    """MarginSoftmaxLoss in training: for AdaFace μ, σ first move by the batch's norms (the paper's
    moving averages, momentum 0.01, unbiased std), then the loss uses them."""
    e, _, labels = inputs()
    head = MarginSoftmaxLoss(e.shape[1], 9, loss=loss, margins=MARGINS[loss], scale=S, dtype=torch.float64)
    mu = sigma = None
    if loss == "adaface":
        head.norm_mean.fill_(MU)
        head.norm_std.fill_(SIGMA)
        norms = e.norm(dim=1)
        mu = 0.99 * MU + 0.01 * float(norms.mean())
        sigma = 0.99 * SIGMA + 0.01 * float(norms.std())
    w = head.weight.detach().clone()
    e_leaf = e.clone().requires_grad_()
    with petal_fast.use_backend(backend):
        loss_value = head(e_leaf, labels)
    got = (loss_value, *torch.autograd.grad(loss_value, (e_leaf, head.weight)))
    if loss == "adaface":  # the moving averages are float32 buffers: compare at that precision
        assert math.isclose(float(head.norm_mean), mu, rel_tol=1e-6)
        assert math.isclose(float(head.norm_std), sigma, rel_tol=1e-6)
        mu, sigma = float(head.norm_mean), float(head.norm_std)  # the values the loss used
    want = grads_of(lambda e, w: textbook_loss(e, w, labels, loss, "exact", mu or MU, sigma or SIGMA), e, w)
    tol = 1e-7 if loss == "adaface" else 1e-9  # AdaFace: σ + ε is rounded in the float32 buffer's dtype
    for name, a, b in zip(("loss", "dE", "dW"), got, want):
        assert rel_err(a, b) < tol, f"{name}: rel err {rel_err(a, b):.3g}"


@pytest.mark.parametrize("grad", ["exact", "straight_through"])
@pytest.mark.parametrize("loss", list(MARGINS))
def test_fused_margin_math_is_the_textbook_formula(loss, grad):
    """``petal_fast.ops.margin_loss.per_row`` (what the fused paths apply to the target cosines) on its own:
    the target logit and its derivative, and ẑ, equal the textbook's."""
    cos = (torch.rand(64, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    norms = 4.0 + 4.0 * torch.rand(64, dtype=torch.float64)
    z = adaface_zhat(norms, MU, SIGMA, H) if loss == "adaface" else None
    if z is not None:
        assert torch.allclose(z, zhat(norms, MU, SIGMA), rtol=0, atol=1e-14)
        assert (z.abs() < 1).any() and (z.abs() == 1).any()  # both the linear part and the clip are hit
    got = target_logit(cos, loss, resolve_margins(loss, MARGINS[loss]), S, grad, z)
    want = textbook_target(loss, cos, norms)
    if grad == "straight_through":
        want = S * cos + (want - S * cos).detach()
    (dgot,), (dwant,) = torch.autograd.grad(got.sum(), cos), torch.autograd.grad(want.sum(), cos)
    assert rel_err(got, want) < 1e-12 and rel_err(dgot, dwant) < 1e-12
