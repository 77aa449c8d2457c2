"""Eager calls skip custom-op dispatch (ops/_eager.py) and compute exactly what the operators do; anything
that traces still sees the operators (petal_fast::fused_margin_loss, petal_fast::fused_brisque)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import petal_fast
from petal_fast import _ext
from petal_fast.ops import _eager
from petal_fast.ops.brisque.library import DegenerateImageWarning, brisque_impl, fused_brisque
from petal_fast.ops.margin_loss.dispatch import margin_loss_core
from petal_fast.ops.margin_loss.library import EagerMarginLoss, fused_margin_loss
from petal_fast.quality import brisque

from conftest import triton_interpreter_ok

BACKENDS = ["torch",
            pytest.param("cpp", marks=pytest.mark.skipif(not _ext.has_op("margin_loss"), reason="C++ extension not built")),
            pytest.param("triton", marks=pytest.mark.skipif(not triton_interpreter_ok(), reason="Triton interpreter off"))]


def test_eager_only_for_plain_tensors_outside_any_trace():
    x, p = torch.randn(3), torch.nn.Parameter(torch.randn(3))
    assert _eager.eager(x, p)
    with FakeTensorMode() as mode:
        assert not _eager.eager(mode.from_tensor(x))
    seen = []
    torch.vmap(lambda t: seen.append(_eager.eager(t)) or t)(torch.randn(2, 3))
    make_fx(lambda t: seen.append(_eager.eager(t)) or t + 1)(x)
    torch.compile(lambda t: seen.append(_eager.eager(t)) or t + 1, backend="eager")(x)
    assert seen == [False, False, False]
    with torch.device("cpu"):  # a __torch_function__ mode
        assert not _eager.eager(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_loss_core_eager_equals_the_operator(backend):
    B, C, D = 6, 37, 16
    e, w = torch.randn(B, D), torch.randn(C, D)
    labels = torch.randint(0, C, (B,))
    labels[0] = -1  # a row whose target lives on another shard
    g = [torch.randn(B) for _ in range(3)]
    outs = {}
    for route in ("eager", "operator"):
        ee, ww = e.clone().requires_grad_(), w.clone().requires_grad_()
        args = (ee, ww, labels, 30.0)
        if route == "eager":
            out = EagerMarginLoss.apply(*args, backend)
        elif backend == "triton":
            from petal_fast.ops.margin_loss.triton_library import triton_margin_loss
            out = triton_margin_loss(*args)
        else:
            out = fused_margin_loss(*args, backend)
        grads = torch.autograd.grad(out, (ee, ww), g)
        outs[route] = (*out, *grads)
    for name, a, b in zip(("lse", "zsum", "cos_t", "dE", "dW"), outs["eager"], outs["operator"]):
        assert torch.equal(a, b), name


def test_traces_see_the_operators():
    e, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    labels = torch.randint(0, 10, (4,))
    loss_graph = make_fx(lambda e, w, y: margin_loss_core(e, w, y, 30.0, "torch"))(e, w, labels)  # (the value checks
    # before it read the labels: make_fx's real-tensor tracing refuses them)
    assert "petal_fast.fused_margin_loss" in str(loss_graph.code)
    images = torch.rand(2, 3, 16, 18)
    score_graph = make_fx(lambda x: brisque(x))(images)
    assert "petal_fast.fused_brisque" in str(score_graph.code)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=pytest.mark.skipif(
    not _ext.has_op("brisque_score"), reason="C++ extension not built"))])
@pytest.mark.parametrize("features", [False, True])
def test_brisque_eager_equals_the_operator(backend, features):
    images = torch.rand(3, 3, 20, 17)
    images[1] = 0.5  # degenerate: +inf score, NaN features
    with pytest.warns(DegenerateImageWarning) if not features else contextlib.nullcontext():
        eager = brisque_impl(images, features, backend)
    with pytest.warns(DegenerateImageWarning) if not features else contextlib.nullcontext():
        operator = fused_brisque(images, features, backend)
    assert torch.equal(eager.nan_to_num(nan=-1.0), operator.nan_to_num(nan=-1.0))
    with petal_fast.use_backend(backend):
        assert torch.equal(brisque(images[[0, 2]]), brisque_impl(images[[0, 2]], False, backend))
