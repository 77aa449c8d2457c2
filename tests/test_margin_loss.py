"""Fused margin-softmax loss vs the float64 materialised reference, on every backend and variant."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import petal_fast
from petal_fast import _ext
from petal_fast.nn.margin_loss import MarginSoftmaxLoss
from petal_fast.ops.margin_loss import margin_loss, partial_fc_sample
from petal_fast.reference import margin_loss as ref

from conftest import HAS_CUDA, TOL, rel_err, triton_interpreter_ok

VARIANTS = [("cosface", None), ("arcface", None), ("combined", (0.9, 0.3, 0.15)), ("adaface", None)]
GRADS = ["exact", "straight_through"]
CPU_BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not _ext.has_op("margin_loss"),
                                                                      reason="C++ extension not built"))]
# AdaFace μ, σ chosen so ẑ spans [−1, 1] over randn embeddings of norm ≈ √D.
ADA = {"norm_mean": 8.0, "norm_std": 3.0}


def make_inputs(B, C, D, dtype=torch.float32, device="cpu"):
    e = torch.randn(B, D, device=device) * (1.0 + torch.rand(B, 1, device=device))  # varied norms
    w = torch.randn(C, D, device=device)
    labels = torch.randint(0, C, (B,), device=device)
    labels[0] = C - 1
    labels[-1] = 0 if B > 1 else labels[-1]
    return e.to(dtype), w.to(dtype), labels


def run(backend, e, w, labels, dtype=None, **kw):
    """Loss and (dE, dW) of one backend on leaf copies of e, w (cast to ``dtype``)."""
    e = e.detach().to(dtype or e.dtype).requires_grad_()
    w = w.detach().to(dtype or w.dtype).requires_grad_()
    with petal_fast.use_backend(backend):
        loss = margin_loss(e, w, labels, **kw)
    de, dw = torch.autograd.grad(loss.sum(), (e, w))
    return loss, de, dw


def check(backend, e, w, labels, dtype, **kw):
    out = run(backend, e, w, labels, dtype, **kw)
    exp = run("reference", e.to(dtype), w.to(dtype), labels, torch.float64, **kw)  # same rounded inputs
    for name, a, b in zip(("loss", "dE", "dW"), out, exp):
        assert torch.isfinite(a).all(), f"{name} not finite"
        assert a.dtype == (torch.float32 if name == "loss" and dtype != torch.float64 else a.dtype)
        err = rel_err(a, b)
        assert err < TOL[dtype], f"{name}: rel err {err:.3g} >= {TOL[dtype]}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("loss,margins", VARIANTS)
@pytest.mark.parametrize("B,C,D", [(1, 1, 64), (7, 10, 512), (256, 1000, 64), (7, 1000, 512)])
def test_variants_cpu(backend, loss, margins, grad, B, C, D):
    e, w, labels = make_inputs(B, C, D)
    check(backend, e, w, labels, torch.float32, loss=loss, margins=margins, grad=grad, label_smoothing=0.1, **ADA)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss,grad", [("cosface", "exact"), ("arcface", "straight_through")])
def test_large_num_classes(backend, loss, grad):
    e, w, labels = make_inputs(7, 100003, 64)
    check(backend, e, w, labels, torch.float32, loss=loss, grad=grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loss", ["cosface", "arcface", "adaface"])
def test_low_precision_cpu(backend, dtype, loss):
    e, w, labels = make_inputs(33, 300, 64)
    check(backend, e, w, labels, dtype, loss=loss, **ADA)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64(backend):
    e, w, labels = make_inputs(9, 130, 48, torch.float64)
    check(backend, e, w, labels, torch.float64, loss="arcface", label_smoothing=0.2)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("grad", GRADS)
@pytest.mark.parametrize("loss,margins", VARIANTS)
def test_cos_near_plus_minus_one_and_zero_embedding(backend, loss, margins, grad):
    """Rows exactly on (and opposite to) their class centre, and a zero embedding: finite loss and
    gradients, equal to the reference."""
    C, D = 12, 64
    w = torch.randn(C, D)
    labels = torch.tensor([0, 3, C - 1, 5, 7])
    e = torch.stack([w[0] * 2.0, -w[3], w[C - 1] + 1e-7, torch.zeros(D), w[7] * (1 - 1e-7)])
    out = run(backend, e, w, labels, loss=loss, margins=margins, grad=grad, reduction="none", **ADA)
    for t in out:
        assert torch.isfinite(t).all()
    if backend != "reference":
        exp = run("reference", e, w, labels, torch.float64, loss=loss, margins=margins, grad=grad,
                  reduction="none", **ADA)
        for a, b in zip(out, exp):
            assert rel_err(a, b) < 1e-4  # acos' near ±1 is ~1e3: rounding of cos is amplified


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions(backend, reduction):
    e, w, labels = make_inputs(11, 57, 32)
    check(backend, e, w, labels, torch.float32, loss="cosface", reduction=reduction, label_smoothing=0.05)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8])
def test_other_integer_labels(backend, label_dtype):
    e, w, labels = make_inputs(6, 40, 16)
    check(backend, e, w, labels.to(label_dtype), torch.float32, loss="arcface")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_frozen_weight_or_embeddings(backend):
    e, w, labels = make_inputs(6, 40, 16)
    ew = e.clone().requires_grad_()
    with petal_fast.use_backend(backend):
        (de,) = torch.autograd.grad(margin_loss(ew, w, labels), (ew,))
        wg = w.clone().requires_grad_()
        (dw,) = torch.autograd.grad(margin_loss(e, wg, labels), (wg,))
    _, de_ref, dw_ref = run("reference", e, w, labels, torch.float64)
    assert rel_err(de, de_ref) < 1e-5 and rel_err(dw, dw_ref) < 1e-5


def test_reference_matches_literal_formula():
    """The oracle itself against a per-row transcription of docs/design.md §1.3 (ArcFace, smoothing)."""
    e, w, labels = make_inputs(5, 9, 16, torch.float64)
    s, m2, eps_ls = 64.0, 0.5, 0.1
    got = ref.margin_loss(e, w, labels, "arcface", scale=s, label_smoothing=eps_ls, reduction="none")
    for i in range(5):
        cos = [float(F.cosine_similarity(e[i], w[j], dim=0)) for j in range(9)]
        z = [s * c for c in cos]
        y = int(labels[i])
        z[y] = s * math.cos(math.acos(cos[y]) + m2)
        lse = math.log(sum(math.exp(v - max(z)) for v in z)) + max(z)
        want = (1 - eps_ls) * (lse - z[y]) + eps_ls / 9 * sum(lse - v for v in z)
        assert abs(float(got[i]) - want) < 1e-9 * max(1.0, abs(want))


def test_reference_straight_through_target_gradient():
    """straight_through: d loss / d cos_target is s·(p_y − 1), as if no margin were applied."""
    cos_t = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    t = ref.target_logit(cos_t, "arcface", (1.0, 0.5, 0.0), 64.0, "straight_through")
    (g,) = torch.autograd.grad(t.sum(), cos_t)
    assert torch.allclose(g, torch.full_like(g, 64.0))
    assert torch.allclose(t, 64.0 * torch.cos(torch.acos(cos_t) + 0.5))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_partial_fc_sampling(backend):
    e, w, labels = make_inputs(16, 200, 32)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    wg = w.clone().requires_grad_()
    with petal_fast.use_backend(backend):
        loss = margin_loss(e, wg, labels, loss="arcface", sample_rate=0.25, generator=g1)
    loss.backward()
    index, local = partial_fc_sample(labels, 200, 0.25, g2)
    assert index.numel() == 50 and torch.isin(labels, index).all()
    w_ref = w.double()[index].requires_grad_()
    exp = ref.margin_loss(e.double(), w_ref, local, "arcface")
    exp.backward()
    assert rel_err(loss, exp) < 1e-5
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[index] = False
    assert (wg.grad[untouched] == 0).all()
    assert rel_err(wg.grad[index], w_ref.grad) < 1e-5


def test_partial_fc_keeps_all_positives_when_rate_is_small():
    labels = torch.arange(30)
    index, local = partial_fc_sample(labels, 100, 0.01)
    assert index.numel() == 30 and torch.equal(index[local], labels)


# ---- Triton kernels: interpreter on tiny shapes, natively on CUDA -------------------------------

@pytest.mark.skipif(not triton_interpreter_ok(), reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("loss,margins,grad", [("cosface", None, "exact"), ("arcface", None, "straight_through"),
                                               ("combined", (0.9, 0.3, 0.15), "exact"),
                                               ("adaface", None, "exact")])
@pytest.mark.parametrize("B,C,D", [(1, 1, 16), (8, 50, 32), (5, 33, 24)])
def test_triton_interpreter(loss, margins, grad, dtype, B, C, D):
    e, w, labels = make_inputs(B, C, D)
    check("triton", e, w, labels, dtype, loss=loss, margins=margins, grad=grad, label_smoothing=0.1, **ADA)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss,grad", [("cosface", "exact"), ("arcface", "straight_through"), ("adaface", "exact")])
@pytest.mark.parametrize("B,C,D", [(1, 1, 64), (7, 1000, 512), (256, 100003, 512)])
def test_triton_cuda(loss, grad, dtype, B, C, D):
    e, w, labels = make_inputs(B, C, D, device="cuda")
    check("triton", e, w, labels, dtype, loss=loss, grad=grad, **ADA)


# ---- the module and bad input -------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["cosface", "adaface"])
def test_module_matches_functional(loss):
    head = MarginSoftmaxLoss(32, 70, loss=loss, label_smoothing=0.1)
    e, _, labels = make_inputs(10, 70, 32)
    w0 = head.weight.detach().clone()
    stats = (head.norm_mean.clone(), head.norm_std.clone()) if loss == "adaface" else None
    out = head(e, labels)
    out.backward()
    kw = {}
    if loss == "adaface":
        mean, std = ref.adaface_update(e.norm(dim=1), *stats)
        assert torch.allclose(head.norm_mean, mean) and torch.allclose(head.norm_std, std)
        kw = {"norm_mean": mean.double(), "norm_std": std.double()}
    exp, _, dw = run("reference", e, w0, labels, torch.float64, loss=loss, label_smoothing=0.1, **kw)
    assert rel_err(out, exp) < 1e-5 and rel_err(head.weight.grad, dw) < 1e-5
    assert head(e, labels, reduction="none").shape == (10,)


def test_module_eval_keeps_adaface_stats():
    head = MarginSoftmaxLoss(16, 5, loss="adaface").eval()
    e, _, labels = make_inputs(4, 5, 16)
    head(e, labels)
    assert head.norm_mean.item() == 20.0 and head.norm_std.item() == 100.0


BAD = [
    (lambda e, y: (e, y.float()), TypeError, "labels must be an integer"),
    (lambda e, y: (e, y.bool()), TypeError, "labels must be an integer"),
    (lambda e, y: (e, y.tolist()), TypeError, "labels must be an integer tensor"),
    (lambda e, y: (e, torch.full_like(y, 9)), ValueError, "labels must be in"),
    (lambda e, y: (e, torch.full_like(y, -1)), ValueError, "labels must be in"),
    (lambda e, y: (e, y[:-1]), ValueError, "labels must be 1-D with one label per embedding"),
    (lambda e, y: (e, y[:, None]), ValueError, "labels must be 1-D"),
    (lambda e, y: (e[:, :-1], y), ValueError, "embedding_dim mismatch"),
    (lambda e, y: (e[0], y), ValueError, "embeddings must be"),
    (lambda e, y: (e.long(), y), TypeError, "embeddings must be a floating-point"),
    (lambda e, y: (torch.where(torch.arange(4)[:, None] == 2, float("nan"), e), y), ValueError, "non-finite"),
    (lambda e, y: (torch.where(torch.arange(4)[:, None] == 1, float("inf"), e), y), ValueError, "non-finite"),
]


@pytest.mark.parametrize("make_bad,exc,match", BAD)
def test_bad_input_module_and_state(make_bad, exc, match):
    head = MarginSoftmaxLoss(8, 9, loss="adaface")
    e, _, labels = make_inputs(4, 9, 8)
    e_bad, y_bad = make_bad(e, labels)
    with pytest.raises(exc, match=match):
        head(e_bad, y_bad)
    assert head.norm_mean.item() == 20.0 and head.norm_std.item() == 100.0  # nothing updated


@pytest.mark.parametrize("kw,match", [({"loss": "sphereface"}, "loss must be one of"),
                                      ({"grad": "approx"}, "grad must be one of"),
                                      ({"loss": "combined"}, "margins=.* is required"),
                                      ({"margins": (0.5,)}, "must have 3 value"),
                                      ({"scale": -1.0}, "scale must be"),
                                      ({"label_smoothing": 1.0}, "label_smoothing must be"),
                                      ({"sample_rate": 0.0}, "sample_rate must be"),
                                      ({"reduction": "max"}, "reduction must be")])
def test_bad_arguments(kw, match):
    e, w, labels = make_inputs(3, 5, 8)
    with pytest.raises(ValueError, match=match):
        margin_loss(e, w, labels, **kw)


def test_bad_weight_and_module_arguments():
    e, w, labels = make_inputs(3, 5, 8)
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        margin_loss(e, w.long(), labels)
    with pytest.raises(ValueError, match="num_classes must be"):
        MarginSoftmaxLoss(8, 0)
    with pytest.raises(ValueError, match="embedding_dim must be"):
        MarginSoftmaxLoss(0, 4)


@pytest.mark.parametrize("backend", ["torch"] + (["cpp"] if _ext.load_error() is None else []))
def test_torch_func_transforms_get_a_clear_error_and_reference_supports_them(backend):
    """grad / vmap over the fused loss: one message saying what to do (before: torch-internal messages
    about an autograd.Function's setup_context or data-dependent control flow)."""
    e, w, y = torch.randn(4, 8), torch.randn(5, 8), torch.tensor([0, 1, 2, 3])
    head = MarginSoftmaxLoss(8, 5)
    transforms = {"grad": lambda f: torch.func.grad(f)(e), "vmap": lambda f: torch.func.vmap(f)(e[None].expand(2, 4, 8))}
    for name, apply in transforms.items():
        for f in (lambda x: margin_loss(x, w, y), lambda x: head(x, y)):
            with petal_fast.use_backend(backend), pytest.raises(NotImplementedError, match="use_backend.'reference'."):
                apply(f)
            with petal_fast.use_backend("reference"):
                apply(f)
    with petal_fast.use_backend("reference"):
        got = torch.func.grad(lambda x: margin_loss(x, w, y))(e)
    x = e.clone().requires_grad_()
    with petal_fast.use_backend(backend):
        margin_loss(x, w, y).backward()
    torch.testing.assert_close(got, x.grad, rtol=1e-4, atol=1e-5)
