"""A search of PetalLinear's inputs for anything that changes the result silently (issue: "the last
silent wrongs"): requires_grad flags, dtypes of every tensor, non-contiguous strides of every tensor,
autocast. Each drawn case is compared with the float64 reference — output and every gradient asked for."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rel_err
from petal_fast import use_backend
from petal_fast.ops.petal_linear import petal_linear
from petal_fast.reference import petal_linear as ref_petal_linear

NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "alpha")
LOW = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in another memory layout: transposed storage, or a strided slice of a bigger buffer."""
    if kind == "dense" or t.dim() == 0:
        return t
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backend=st.sampled_from(["torch", "cpp"]),
       x_dtype=st.sampled_from([torch.float32, torch.float64]),
       param_dtype=st.sampled_from([torch.float32, torch.float64]),
       alpha_dtype=st.sampled_from([torch.float32, torch.float64, torch.float16]),
       layouts=st.lists(st.sampled_from(["dense", "transposed", "sliced"]), min_size=6, max_size=6),
       grads=st.lists(st.booleans(), min_size=6, max_size=6),
       p=st.sampled_from([0.0, 0.3]), branches=st.sampled_from([1, 2]), bias=st.booleans())
def test_no_input_changes_the_result_silently(backend, x_dtype, param_dtype, alpha_dtype, layouts, grads, p,
                                              branches, bias):
    m_img, images, k, n, r = 3, 2, 12, 7, 3
    base = {"x": torch.randn(images, m_img, k, dtype=torch.float64), "weight": torch.randn(n, k, dtype=torch.float64) / 3,
            "bias": torch.randn(n, dtype=torch.float64) if bias else None,
            "lora_A": torch.randn(branches, r, k, dtype=torch.float64) / 3,
            "lora_B": torch.randn(branches, n, r, dtype=torch.float64),
            "alpha": torch.rand(images, dtype=torch.float64) if branches == 2 else None}
    dtypes = {"x": x_dtype, "alpha": alpha_dtype, **{n_: param_dtype for n_ in NAMES[1:5]}}
    ins, refs = {}, {}
    for i, name in enumerate(NAMES):
        t = base[name]
        if t is None:
            ins[name] = refs[name] = None
            continue
        low = _layout(t.to(dtypes[name]), layouts[i]).requires_grad_(grads[i])
        ins[name] = low
        refs[name] = low.detach().double().requires_grad_(grads[i])
    with use_backend(backend):
        y = petal_linear(*(ins[n_] for n_ in NAMES), 0.7, p, 99, 4)
    expect = ref_petal_linear(*(refs[n_] for n_ in NAMES), 0.7, p, 99, 4)
    compute = x_dtype  # the op computes in x's dtype (the parameters are cast to it, as PEFT does)
    tol = max(LOW[compute], LOW[alpha_dtype] if branches == 2 else 0.0, LOW[param_dtype])
    assert y.dtype == x_dtype and y.shape == expect.shape
    assert rel_err(y, expect) < tol
    if y.requires_grad:
        dy = torch.randn_like(expect)
        y.backward(dy.to(y.dtype))
        expect.backward(dy)
    for name in NAMES:
        t = ins[name]
        if t is None or not t.requires_grad:
            continue
        assert t.grad is not None, f"{name} requires grad but got none"
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        assert rel_err(t.grad, refs[name].grad) < 20 * tol, name


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_autocast_computes_in_the_autocast_dtype_like_f_linear(backend):
    """Under torch.autocast the op is cast like F.linear: bf16 compute, a bf16 output, fp32 master gradients."""
    x = torch.randn(4, 3, 16, requires_grad=True)
    w, b = torch.randn(10, 16) / 4, torch.randn(10)
    a, bb = (torch.randn(2, 2, 16) / 4).requires_grad_(), torch.randn(2, 10, 2).requires_grad_()
    alpha = torch.rand(4)
    with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        y = petal_linear(x, w, b, a, bb, alpha, 0.5)
        ref = torch.nn.functional.linear(x, w, b)
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert rel_err(y, ref_petal_linear(x.double(), w.double(), b.double(), a.double(), bb.double(),
                                       alpha.double(), 0.5)) < 2e-2
