"""The Triton backends of PetalLinear, the margin core and BRISQUE as ``torch.library.triton_op``: the operators' numbers (Triton
interpreter, against the float64 composition), their opcheck, which operator the module calls, and
— with real (not interpreted) Triton JIT kernels, in a subprocess — that a compiled graph holds each
kernel launch as a node Inductor schedules, with a symbolic grid under a dynamic batch.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import petal_fast
from conftest import HAS_CUDA, rel_err, triton_interpreter_ok

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("needs Triton", allow_module_level=True)
interpreter = pytest.mark.skipif(not triton_interpreter_ok(), reason="CPU tensors need the Triton interpreter")


def inputs(m: int = 12, k: int = 13, n: int = 19, r: int = 3, images: int = 4, dtype=torch.float32):
    """Odd shapes; B ≠ 0; two branches as the layer's parameters (A (2, r, k), B (2, n, r)) and α."""
    x = torch.randn(m, k, dtype=dtype)
    w, b = torch.randn(n, k, dtype=dtype) / 4, torch.randn(n, dtype=dtype)
    lora_a, lora_b = torch.randn(2, r, k, dtype=dtype) / 4, torch.randn(2, n, r, dtype=dtype) / 4
    alpha = torch.rand(images, dtype=dtype)
    return [x, w, b, lora_a, lora_b, alpha]


def lib():
    from petal_fast.ops.petal_linear import triton_library as petal_linear_triton_library
    return petal_linear_triton_library


GRAD = (0, 1, 2, 3, 4, 5)  # x, W, b, A, B, α: every input can ask for its gradient


@interpreter
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_triton_op_matches_float64_composition(p):
    """Forward and every gradient (x, W, b, A, B, α) of the triton_op against the torch composition in
    float64 — the same dropout masks, regenerated from a seed tensor the kernels read on the device."""
    from petal_fast.ops.petal_linear.library import fused_petal_linear
    args = inputs()
    for i in GRAD:
        args[i].requires_grad_()
    seed = torch.tensor([1234567])
    y, u = lib().triton_petal_linear(*args, 0.7, p, seed, 11)
    args64 = [t.detach().double().requires_grad_(t.requires_grad) for t in args]
    y64, u64 = fused_petal_linear(*args64, 0.7, p, seed, 11, "torch")
    assert rel_err(y, y64) < 1e-5 and rel_err(u, u64) < 1e-5
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [args[i] for i in GRAD], dy)
    expect = torch.autograd.grad(y64, [args64[i] for i in GRAD], dy.double())
    for name, g, e in zip(("x", "W", "b", "A", "B", "alpha"), got, expect):
        assert rel_err(g, e) < 1e-5, name


@interpreter
def test_triton_op_rules():
    """Empty batch (no launch, zero adapter gradients), validate (non-finite α), double backward."""
    args = inputs(m=0, images=0)
    for i in (0, 3, 4):
        args[i].requires_grad_()
    y, u = lib().triton_petal_linear(*args, 0.7, 0.2, torch.tensor([5]), 0)
    assert y.shape == (0, 19) and u.shape == (0, 6)
    gx, ga, gb = torch.autograd.grad(y.sum(), [args[i] for i in (0, 3, 4)])
    assert gx.shape == (0, 13) and not ga.any() and not gb.any()

    args = inputs()
    args[5][1] = float("nan")
    with pytest.raises(ValueError, match="alpha contains non-finite values"):
        lib().triton_petal_linear(*args, 0.7, 0.0, torch.tensor([0]), 0, True)

    args = inputs()
    args[0].requires_grad_()
    y, _ = lib().triton_petal_linear(*args, 0.7, 0.0, torch.tensor([0]), 0)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), args[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        gx.sum().backward()


@interpreter
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_triton_op(p):
    """Schema, autograd registration and fake tensors (under the interpreter the fake call skips the
    launch). Not test_aot_dispatch_dynamic: AOT decomposes a triton_op into its kernel launches, which
    interpreted kernels cannot be (the subprocess test below checks that decomposition with JIT kernels)."""
    op = lib().triton_petal_linear._opoverload  # registered by importing the module
    args = inputs()
    for i in (0, 3, 4, 5):
        args[i].requires_grad_()
    full = (*args, 0.7, p, torch.tensor([9]), 3, False)
    torch.library.opcheck(op, full, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    y, _ = op(*full)
    for i in range(6):  # each input in a permuted layout: same numbers (A and B read through their strides)
        permuted = list(full)
        t = args[i].detach()
        permuted[i] = t.t().contiguous().t() if t.dim() == 2 else t.transpose(0, -1).contiguous().transpose(0, -1)
        torch.testing.assert_close(op(*permuted)[0], y)
    bwd = torch.ops.petal_fast.triton_petal_linear_backward.default
    _, u = op(*[a.detach() for a in args], 0.7, p, torch.tensor([9]), 3, False)
    dy = torch.randn(12, 19)
    for need in ((True, True, True, True), (False, False, False, False)):
        torch.library.opcheck(bwd, (dy, args[0].detach(), args[1], args[3].detach(), args[4].detach(),
                                    args[5].detach(), u, 0.7, p, torch.tensor([9]), 3, *need),
                              test_utils=("test_schema", "test_faketensor"))


@interpreter
def test_module_routes_on_the_triton_backend(monkeypatch):
    """With the Triton backend an eager training call runs the operator bodies behind the plain
    autograd.Function (no custom-op dispatch), inference runs the body directly, and a graph compiled
    under the interpreter uses the opaque operator (interpreted kernels cannot be traced); a compiled
    graph with real JIT kernels gets the triton_op (test_compiled_graph_holds_the_kernel_launches)."""
    import importlib
    dispatch = importlib.import_module("petal_fast.ops.petal_linear.dispatch")  # the module (the package exports the function)
    seen = []

    def spy(module, name, label):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: seen.append(label) or real(*a, **k))

    spy(lib(), "triton_petal_linear", "triton_op")
    spy(dispatch, "fused_petal_linear", "opaque")
    spy(dispatch, "forward_impl", "body")
    spy(dispatch.EagerPetalLinear, "apply", "eager")
    layer = petal_fast.PetalLinear(13, 19, rank=3)
    torch.nn.init.normal_(layer.lora_B)
    x, alpha = torch.randn(4, 3, 13, requires_grad=True), torch.rand(4)
    with petal_fast.use_backend("triton"):
        y = layer(x, alpha=alpha)
        with torch.no_grad():
            y_inf = layer(x, alpha=alpha)
        assert seen == ["eager", "body"]
        seen.clear()
        y_c = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, alpha=alpha)
        assert seen == ["opaque"]
    with petal_fast.use_backend("reference"):
        y_ref = layer(x, alpha=alpha)
    for out in (y, y_inf, y_c):
        assert rel_err(out, y_ref) < 1e-5


def margin_lib():
    from petal_fast.ops.margin_loss import triton_library as margin_loss_triton_library
    return margin_loss_triton_library


@interpreter
def test_margin_triton_op_matches_float64_composition():
    """The margin core's triton_op: (lse, zsum, cos_t) and dE, dW against the torch composition in
    float64, including a label outside [0, C) (a row whose class is on another rank)."""
    from petal_fast.ops.margin_loss.library import fused_margin_loss
    e, w = torch.randn(7, 12, requires_grad=True), torch.randn(45, 12, requires_grad=True)
    labels = torch.randint(0, 45, (7,))
    labels[3] = -1
    out = margin_lib().triton_margin_loss(e, w, labels, 16.0)
    e64, w64 = (t.detach().double().requires_grad_() for t in (e, w))
    expect = fused_margin_loss(e64, w64, labels, 16.0, "torch")
    for o, x in zip(out, expect):
        assert rel_err(o, x) < 1e-5
    gs = [torch.randn(7) for _ in range(3)]
    got = torch.autograd.grad(out, (e, w), gs)
    want = torch.autograd.grad(expect, (e64, w64), [g.double() for g in gs])
    for g, x in zip(got, want):
        assert rel_err(g, x) < 1e-5


@interpreter
def test_opcheck_margin_triton_op():
    op = torch.ops.petal_fast.triton_margin_loss.default
    e, w = torch.randn(6, 8, requires_grad=True), torch.randn(37, 8, requires_grad=True)
    labels = torch.randint(0, 37, (6,))
    torch.library.opcheck(op, (e, w, labels, 16.0, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    bad = labels.clone()
    bad[0] = 37
    with pytest.raises(ValueError, match="labels must be in"):
        op(e, w, bad, 16.0, True)


@interpreter
def test_brisque_triton_op_matches_torch_backend():
    """BRISQUE's triton_op: features and scores equal the torch backend's; bad values and degenerate
    images behave as in every eager call (ValueError naming the range; +inf with one warning)."""
    from petal_fast.ops.brisque import triton_library as blib
    from petal_fast.ops.brisque.library import DegenerateImageWarning, fused_brisque
    images = torch.rand(2, 3, 20, 21)
    assert rel_err(blib.triton_brisque(images, True), fused_brisque(images, True, "torch")) < 1e-6
    torch.library.opcheck(torch.ops.petal_fast.triton_brisque.default, (images, False),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        blib.triton_brisque(images * 2, False)
    flat = images.clone()
    flat[1] = 0.5
    with pytest.warns(DegenerateImageWarning, match="1 of 2"):
        scores = blib.triton_brisque(flat, False)
    assert rel_err(scores[0], fused_brisque(images[:1], False, "torch")[0]) < 1e-6
    assert scores[1] == float("inf") and torch.isfinite(scores[0])


TRACE = textwrap.dedent("""
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from petal_fast.ops.petal_linear import triton_library as lib

    graphs = []
    class Captured(Exception):
        pass
    def capture(gm, example_inputs):  # the graph Inductor would get; stop there (no GPU to run it)
        graphs.append(gm)
        raise Captured()

    def launches(gm):
        out = []
        for node in gm.graph.nodes:
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                grid = node.kwargs["grid"][0]
                out.append((kernel.fn.__name__, all(isinstance(g, int) for g in grid)))
        return out

    m, k, n, r = 12, 16, 20, 2
    x, dy = torch.randn(m, k), torch.randn(m, n)
    w, b = torch.randn(n, k), torch.randn(n)
    lora_a, lora_b, u, coef = torch.randn(2, r, k), torch.randn(2, n, r), torch.randn(m, 2 * r), torch.rand(4)
    for t in (x, dy, u, coef):
        torch._dynamo.mark_dynamic(t, 0)
    calls = {
        "fwd": lambda x, dy, u, coef, s: lib.triton_petal_linear(x, w, b, lora_a, lora_b, coef, 0.7, 0.25, s, 5),
        "bwd": lambda x, dy, u, coef, s: lib.triton_petal_linear_backward(dy, x, w, lora_a, lora_b, coef, u, 0.7,
                                                                          0.25, s, 5, True, False, False, False),
    }
    e, cw, labels = torch.randn(m, 8), torch.randn(50, 8), torch.randint(0, 50, (m,))
    torch._dynamo.mark_dynamic(e, 0)
    torch._dynamo.mark_dynamic(labels, 0)
    from petal_fast.ops.margin_loss import triton_library as mlib
    calls["margin_fwd"] = lambda x, dy, u, coef, s: mlib.triton_margin_loss(e, cw, labels, 16.0)
    calls["margin_bwd"] = lambda x, dy, u, coef, s: mlib.triton_margin_loss_backward(
        e, cw, labels, torch.zeros(e.shape[0]), torch.ones(e.shape[0]), torch.ones(e.shape[0]),
        torch.ones(e.shape[0]), 16.0, True, True)
    from petal_fast.ops.brisque import triton_library as blib
    imgs = torch.rand(m, 3, 24, 28)
    torch._dynamo.mark_dynamic(imgs, 0)
    calls["brisque"] = lambda x, dy, u, coef, s: blib.triton_brisque(imgs, False)
    for name, fn in calls.items():
        graphs.clear()
        try:
            torch.compile(fn, backend=aot_autograd(fw_compiler=capture), fullgraph=True)(
                x, dy, u, coef, torch.tensor([3]))
        except Exception as err:
            assert "Captured" in str(err), err
        print(name, launches(graphs[0]))
""")


def test_compiled_graph_holds_the_kernel_launches():
    """torch.compile(fullgraph=True, dynamic batch) of the forward and backward operators: AOTAutograd
    decomposes them into their Triton launches (what Inductor schedules), each with a grid symbolic
    in the batch — not one opaque call. Real JIT kernels (TRITON_INTERPRET=0), traced on fake tensors."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TORCH_LOGS": "-dynamo"}
    proc = subprocess.run([sys.executable, "-c", TRACE], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    fwd, bwd = eval(lines["fwd"]), eval(lines["bwd"])  # noqa: S307  (our own subprocess's repr)
    assert [name for name, _ in fwd] in (["shrink_kernel", "fwd_kernel"], ["fwd_kernel"])
    assert [name for name, _ in bwd] in (["bwd_dy_kernel", "bwd_dx_kernel", "finalize_kernel"],
                                         ["bwd_onepass_kernel", "finalize_kernel"])
    # every grid depends on the dynamic batch, but the cast of [dA | dB] (R·(K + N) elements) to the
    # parameters' dtype
    assert not any(static for name, static in fwd + bwd if name != "finalize_kernel")
    assert dict(bwd)["finalize_kernel"]
    assert [name for name, _ in eval(lines["margin_fwd"])] == ["_fwd_kernel"]  # noqa: S307
    assert [name for name, _ in eval(lines["margin_bwd"])] == ["_bwd_de_kernel", "_bwd_dw_kernel"]  # noqa: S307
    brisque = eval(lines["brisque"])  # noqa: S307  (one launch per scale)
    assert brisque == [("_brisque_moments_kernel", False)] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_inductor_compiles_the_kernels_into_its_code():
    """CUDA, Inductor: the compiled PetalLinear's generated code launches the fused kernels itself
    (no opaque operator call), matches eager, and a new batch size does not recompile."""
    import torch._dynamo.testing
    from torch._inductor.utils import run_and_get_code
    layer = petal_fast.PetalLinear(64, 96, rank=8).cuda()
    torch.nn.init.normal_(layer.lora_B, std=0.05)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
    for batch in (3, 5):
        x = torch.randn(batch, 7, 64, device="cuda", requires_grad=True)
        alpha = torch.rand(batch, device="cuda")
        out, codes = run_and_get_code(lambda: compiled(x, alpha=alpha))
        if batch == 3:
            code = "\n".join(codes)
            assert "fwd_kernel" in code and "triton_petal_linear" not in code
        assert rel_err(out, layer(x, alpha=alpha)) < 1e-5
        (g,) = torch.autograd.grad(out.sum(), x)
        (g_eager,) = torch.autograd.grad(layer(x, alpha=alpha).sum(), x)
        assert rel_err(g, g_eager) < 1e-5
    assert counter.frame_count == 1
