"""A search of the margin loss's and BRISQUE's inputs for anything that changes the result silently
(dtypes, memory layouts, requires_grad flags, label dtypes): every drawn case against the float64
reference (PetalLinear's search is tests/test_petal_linear_inputs.py)."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rel_err
from petal_fast import use_backend
from petal_fast.ops.margin_loss import margin_loss
from petal_fast.quality import brisque
from petal_fast.reference import margin_loss as ref_margin

LAYOUTS = ("dense", "transposed", "sliced")


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "sliced" and t.dim() >= 1:
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    return t


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backend=st.sampled_from(["torch", "cpp"]), loss=st.sampled_from(["cosface", "arcface", "adaface"]),
       e_dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       w_dtype=st.sampled_from([torch.float32, torch.float64]),
       label_dtype=st.sampled_from([torch.int64, torch.int32]),
       layouts=st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3),
       grads=st.lists(st.booleans(), min_size=2, max_size=2), grad=st.sampled_from(["exact", "straight_through"]))
def test_margin_loss_inputs_never_change_the_result_silently(backend, loss, e_dtype, w_dtype, label_dtype, layouts,
                                                             grads, grad):
    b, d, c = 6, 8, 23
    e64, w64 = torch.randn(b, d, dtype=torch.float64), torch.randn(c, d, dtype=torch.float64)
    labels64 = torch.randint(0, c, (b,))
    e = _layout(e64.to(e_dtype), layouts[0]).requires_grad_(grads[0])
    w = _layout(w64.to(w_dtype), layouts[1]).requires_grad_(grads[1])
    labels = _layout(labels64.to(label_dtype), layouts[2])
    er, wr = e.detach().double().requires_grad_(grads[0]), w.detach().double().requires_grad_(grads[1])
    margins = ref_margin.resolve_margins(loss, None)
    with use_backend(backend):
        got = margin_loss(e, w, labels, loss=loss, scale=16.0, grad=grad)
    expect = ref_margin.margin_loss(er, wr, labels64, loss, margins, 16.0, grad)
    tol = 2e-2 if e_dtype == torch.bfloat16 else 1e-5
    assert rel_err(got, expect) < tol
    if got.requires_grad:
        got.backward()
        expect.backward()
    for t, r, name in ((e, er, "embeddings"), (w, wr, "weight")):
        if t.requires_grad:
            assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
            assert rel_err(t.grad, r.grad) < 10 * tol, name


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(backend=st.sampled_from(["torch", "cpp"]), dtype=st.sampled_from(["uint8", "float32", "float64"]),
       layout=st.sampled_from(["dense", "channels_last", "sliced"]), channels=st.sampled_from([1, 3]))
def test_brisque_inputs_never_change_the_result_silently(backend, dtype, layout, channels):
    """The same image content in any dtype the op accepts and any memory layout gives the same scores."""
    u8 = torch.randint(0, 256, (2, channels, 20, 23), dtype=torch.uint8)
    images = {"uint8": u8, "float32": u8.float() / 255, "float64": u8.double() / 255}[dtype]
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        big = torch.zeros(2, channels, 20, 46, dtype=images.dtype)
        big[..., ::2] = images
        images = big[..., ::2]
    with use_backend(backend):
        got = brisque(images)
        expect = brisque(u8.double() / 255)
    assert got.dtype == torch.float64 and rel_err(got, expect) < 1e-6
