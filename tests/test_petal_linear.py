"""PetalLinear: every CPU backend against the float64 reference, gradients, dropout, errors."""
from __future__ import annotations

import os

import pytest
import torch

import petal_fast
from petal_fast import PetalLinear, _ext, use_backend
from petal_fast.ops.petal_linear import petal_linear
from petal_fast.reference import dropout_mask, petal_linear as ref_petal_linear
from conftest import TOL, rel_err

CPU_BACKENDS = ["torch", "cpp"]


def make_inputs(lead, k, n, rank, images, branches=2, dtype=torch.float32, bias=True):
    x = torch.randn(*lead, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    a = torch.randn(branches, rank, k, dtype=dtype) / k**0.5
    bb = torch.randn(branches, n, rank, dtype=dtype)
    alpha = torch.rand(images, dtype=dtype) if branches == 2 else None
    return x, w, b, a, bb, alpha


def check_against_reference(backend, x, w, b, a, bb, alpha, scale, p, seed, dtype, x_grad=True):
    """Forward and the gradients of x (if ``x_grad``), lora_A, lora_B of ``backend`` vs the float64 reference."""
    d64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    xr, ar, br = (d64(t).requires_grad_() for t in (x, a, bb))
    ref = ref_petal_linear(xr, d64(w), d64(b), ar, br, d64(alpha), scale, p, seed)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    xs, as_, bs = (t.detach().to(dtype).requires_grad_() for t in (x, a, bb))
    xs.requires_grad_(x_grad)
    with use_backend(backend):
        out = petal_linear(xs, w.to(dtype), None if b is None else b.to(dtype), as_, bs,
                           None if alpha is None else alpha.to(dtype), scale, p, seed)
    out.backward(dy.to(dtype))
    tol = TOL[dtype]
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < tol, "forward"
    assert xs.grad is None if not x_grad else rel_err(xs.grad, xr.grad) < tol, "dx"
    assert rel_err(as_.grad, ar.grad) < tol, "dA"
    assert rel_err(bs.grad, br.grad) < tol, "dB"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lead,images", [((1,), 1), ((37,), 1), ((3, 7), 3), ((2, 3, 5), 2), ((130,), 13)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_shapes_and_dropout(backend, lead, images, p):
    x, w, b, a, bb, alpha = make_inputs(lead, 24, 19, 4, images)
    check_against_reference(backend, x, w, b, a, bb, alpha, 0.7, p, 1234, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rank", [1, 4, 8, 16, 64])
def test_ranks(backend, rank):
    x, w, b, a, bb, alpha = make_inputs((4, 9), 40, 33, rank, 4)
    check_against_reference(backend, x, w, b, a, bb, alpha, 1.3, 0.0, 0, torch.float32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("alpha_value", [0.0, 1.0])
def test_alpha_extremes_select_one_branch(backend, alpha_value):
    x, w, b, a, bb, _ = make_inputs((2, 5), 16, 12, 3, 2)
    alpha = torch.full((2,), alpha_value)
    check_against_reference(backend, x, w, b, a, bb, alpha, 1.0, 0.0, 0, torch.float32)
    # α = 0 → only branch_lr contributes; α = 1 → only branch_hr
    other = a.clone()
    other[int(1 - alpha_value)] += 1.0  # perturb the branch that must be silent
    with use_backend(backend):
        y1 = petal_linear(x, w, b, a, bb, alpha, 1.0)
        y2 = petal_linear(x, w, b, other, bb, alpha, 1.0)
    torch.testing.assert_close(y1, y2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_one_branch_and_no_bias(backend, p):
    x, w, b, a, bb, alpha = make_inputs((11,), 20, 14, 5, 1, branches=1, bias=False)
    check_against_reference(backend, x, w, b, a, bb, alpha, 2.0, p, 77, torch.float32)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("branches", [1, 2])
def test_gradients_have_the_parameters_strides(backend, branches):
    """Each adapter's gradient has its parameter's exact strides, size-1 dims included: DDP compares
    them literally with its bucket views (else a warning and a copy per step)."""
    layer = PetalLinear(16, 24, rank=4, branches=branches)
    alpha = torch.rand(3) if branches == 2 else None
    with use_backend(backend):
        layer(torch.randn(3, 5, 16), alpha=alpha).sum().backward()
    for name, param in layer.named_parameters():
        if param.requires_grad:
            assert param.grad.stride() == param.stride(), name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(backend, dtype):
    x, w, b, a, bb, alpha = make_inputs((6, 10), 32, 24, 8, 6)
    check_against_reference(backend, x, w, b, a, bb, alpha, 0.5, 0.1, 5, dtype)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gradcheck_float64(backend, p):
    x, w, b, a, bb, alpha = (None if t is None else t.double() for t in make_inputs((2, 3), 7, 5, 2, 2))
    x.requires_grad_(), a.requires_grad_(), bb.requires_grad_()

    def f(x, a, bb):
        with use_backend(backend):
            return petal_linear(x, w, b, a, bb, alpha, 0.9, p, 42)
    assert torch.autograd.gradcheck(f, (x, a, bb))


def test_large_rows_blocked_cpp():
    """Many row blocks and images spanning block edges (the C++ path blocks rows)."""
    x, w, b, a, bb, alpha = make_inputs((7, 211), 48, 40, 8, 7)
    for p in (0.0, 0.15):
        check_against_reference("cpp", x, w, b, a, bb, alpha, 1.0, p, 9, torch.float32)


def test_non_contiguous_input():
    x, w, b, a, bb, alpha = make_inputs((9, 2), 16, 8, 2, 1)
    xt = x.new_empty(2, 9, 16).copy_(x.transpose(0, 1)).transpose(0, 1)
    assert not xt.is_contiguous()
    for backend in CPU_BACKENDS:
        with use_backend(backend):
            torch.testing.assert_close(petal_linear(xt, w, b, a, bb, alpha), petal_linear(x, w, b, a, bb, alpha))


# --- dropout masks ----------------------------------------------------------------------------
def test_dropout_mask_properties():
    m = dropout_mask(7, 0, 300, 200, 0.3)
    keep = (m > 0).double().mean().item()
    assert abs(keep - 0.7) < 0.01
    assert torch.allclose(m[m > 0], torch.tensor(1 / 0.7))
    assert not torch.equal(m, dropout_mask(8, 0, 300, 200, 0.3)), "seed must change the mask"
    assert not torch.equal(m, dropout_mask(7, 1, 300, 200, 0.3)), "branches must be independent"
    torch.testing.assert_close(m[100:150], dropout_mask(7, 0, 50, 200, 0.3, row_offset=100))
    assert torch.equal(dropout_mask(7, 0, 4, 4, 0.0), torch.ones(4, 4))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_exact_masks(backend):
    """With p > 0 the output is exactly base + Σ c_k · (mask_k ⊙ P_k) with the published masks."""
    x, w, b, a, bb, alpha = (t.double() for t in make_inputs((4, 6), 12, 10, 3, 4))
    p, seed = 0.4, 2024
    with use_backend(backend):
        y = petal_linear(x, w, b, a, bb, alpha, 1.0, p, seed)
    x2 = x.reshape(-1, 12)
    al = alpha.repeat_interleave(6)[:, None]
    expect = x2 @ w.T + b
    for k, c in enumerate((1 - al, al)):
        expect = expect + c * dropout_mask(seed, k, 24, 10, p, dtype=torch.float64) * ((x2 @ a[k].T) @ bb[k].T)
    torch.testing.assert_close(y.reshape(-1, 10), expect, rtol=1e-12, atol=1e-12)


# --- bad input --------------------------------------------------------------------------------
def test_bad_inputs():
    x, w, b, a, bb, alpha = make_inputs((4, 5), 8, 6, 2, 4)
    call = lambda **kw: petal_linear(**{**dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, alpha=alpha), **kw})  # noqa: E731
    with pytest.raises(ValueError, match="x: last dimension"):
        call(x=torch.randn(4, 5, 9))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        call(x=torch.ones(4, 5, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="multiple of the number of images"):
        call(alpha=torch.rand(3))
    with pytest.raises(ValueError, match="non-finite"):
        call(alpha=torch.tensor([0.5, float("nan"), 0.1, 0.2]))
    with pytest.raises(TypeError, match="alpha must be a floating-point"):
        call(alpha=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="alpha is on"):
        call(alpha=torch.rand(4, device="meta"))
    with pytest.raises(ValueError, match="alpha must be 1-D"):
        call(alpha=torch.rand(2, 2))
    with pytest.raises(ValueError, match="alpha is required"):
        call(alpha=None)
    with pytest.raises(ValueError, match="lora_A must be"):
        call(lora_A=torch.randn(2, 0, 8))
    with pytest.raises(ValueError, match="lora_B must be"):
        call(lora_B=torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="dropout"):
        petal_linear(x, w, b, a, bb, alpha, 1.0, 1.0)
    with pytest.raises(ValueError, match="rank must be"):
        PetalLinear(8, 6, rank=0)
    with pytest.raises(ValueError, match="branches must be"):
        PetalLinear(8, 6, branches=3)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["reference"])
def test_alpha_checked_once_per_version(backend, monkeypatch):
    """The layers of a forward pass get the same α (through a scope or passed explicitly): its values
    are checked once, and again only after a change (its version counter moves) or for another α tensor;
    an inference tensor (no version counter) is checked on every call."""
    import importlib
    ops = importlib.import_module("petal_fast.ops.petal_linear.dispatch")
    checked = []
    real = ops.check_alpha_values
    monkeypatch.setattr(ops, "check_alpha_values", lambda *a, **k: (checked.append(1), real(*a, **k))[1])
    x, w, b, a, bb, alpha = make_inputs((6, 3), 8, 5, 2, 6)
    layers = [PetalLinear(8, 5, rank=2, scale=scale) for scale in (0.5, 0.5, 2.0, 0.5)]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(w), layer.bias.copy_(b), layer.lora_A.copy_(a), layer.lora_B.copy_(bb)
    fused = backend != "reference"  # the test oracle checks every call
    with use_backend(backend), torch.no_grad():
        with petal_fast.alpha_scope(alpha):
            for layer in layers:
                torch.testing.assert_close(layer(x), ref_petal_linear(x, w, b, a, bb, alpha, layer.scale))
            assert len(checked) == (1 if fused else 4)
            alpha.mul_(0.5)  # in place: the version counter moves
            torch.testing.assert_close(layers[0](x), ref_petal_linear(x, w, b, a, bb, alpha, 0.5))
            assert len(checked) == (2 if fused else 5)
            alpha[2] = float("inf")
            with pytest.raises(ValueError, match="non-finite"):
                layers[0](x)
        alpha[2] = 0.5
        before = len(checked)
        for _ in range(2):  # explicit α, the same tensor: one check (fused), after the change above
            torch.testing.assert_close(petal_linear(x, w, b, a, bb, alpha, 0.5),
                                       ref_petal_linear(x, w, b, a, bb, alpha, 0.5))
        assert len(checked) - before == (1 if fused else 2)
        other = alpha.clone()
        petal_linear(x, w, b, a, bb, other, 0.5)  # another tensor: checked
        assert len(checked) - before == (2 if fused else 3)
        with torch.inference_mode(), petal_fast.alpha_scope(torch.rand(6)) as scope:  # no version counter
            for _ in range(2):
                torch.testing.assert_close(layers[0](x), ref_petal_linear(x, w, b, a, bb, scope.alpha, 0.5))
        assert len(checked) - before == (4 if fused else 5)


def test_backend_switch():
    from petal_fast import settings
    x, w, b, a, bb, alpha = make_inputs((3,), 8, 6, 2, 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("cuda-magic"):
            pass
    with settings.override(backend="reference"):
        assert petal_fast.requested_backend() == "reference"
        with use_backend("cpp"):  # the scoped choice wins over the setting
            assert petal_fast.requested_backend() == "cpp"
        torch.testing.assert_close(petal_linear(x, w, b, a, bb, alpha), ref_petal_linear(x, w, b, a, bb, alpha, 1.0))
    with pytest.raises(ValueError, match="backend .PETAL_FAST_BACKEND. must be one of"):
        settings.configure(backend="nonsense")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    from petal_fast import _ext, backend
    monkeypatch.setattr(_ext, "has_op", lambda name: False)
    monkeypatch.setattr(backend, "_warned", set())
    x, w, b, a, bb, alpha = make_inputs((5,), 8, 6, 2, 1)
    with pytest.warns(RuntimeWarning, match="torch fallback"):
        y = petal_linear(x, w, b, a, bb, alpha)
    torch.testing.assert_close(y, ref_petal_linear(x, w, b, a, bb, alpha, 1.0))
    with use_backend("cpp"), pytest.raises(RuntimeError, match="C\\+\\+ extension is not available"):
        petal_linear(x, w, b, a, bb, alpha)


@pytest.mark.parametrize("path", ["blocked", "whole"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("block_rows", [None, 16])
def test_cpp_paths(path, dtype, p, block_rows):
    """Both C++ strategies (row blocks in cache, or whole-matrix BLAS calls for a large W, whose
    dropout path keeps the masked LoRA terms per row block) agree, with few or many blocks."""
    from petal_fast.cpu_tuning import cpu_tuning
    with cpu_tuning(path=path, block_rows=block_rows):
        x, w, b, a, bb, alpha = make_inputs((5, 37), 64, 48, 8, 5)
        check_against_reference("cpp", x, w, b, a, bb, alpha, 0.6, p, 77, dtype)
        x, w, b, a, bb, alpha = make_inputs((53,), 40, 24, 4, 53, bias=False)
        check_against_reference("cpp", x, w, b, a, bb, alpha, 1.3, p, 5, dtype, x_grad=False)


TUNING_SCRIPT = """
import os, torch
from petal_fast.cpu_tuning import cpu_tuning, get_cpu_tuning
from petal_fast.ops.petal_linear import petal_linear
os.environ["PETAL_FAST_CPU_PATH"], os.environ["PETAL_FAST_CPU_BLOCK_ROWS"] = "blocked", "3"  # after import
x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 2, 8), torch.randn(2, 6, 2)
petal_linear(x, w, None, a, b, torch.rand(4))       # the library loads: it gets the settings read at import
print(get_cpu_tuning())
with cpu_tuning(path="auto", block_rows=0):
    print(get_cpu_tuning())
print(get_cpu_tuning())
"""


@pytest.mark.skipif(not _ext.has_op("petal_linear"), reason="C++ extension not built")
def test_cpp_tuning_knobs_are_read_once_and_set_explicitly():
    import subprocess
    import sys
    env = {**os.environ, "PETAL_FAST_CPU_PATH": "whole", "PETAL_FAST_CPU_BLOCK_ROWS": "24"}
    out = subprocess.run([sys.executable, "-c", TUNING_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:3] == ["('whole', 24)", "('auto', 0)", "('whole', 24)"]
    from petal_fast.cpu_tuning import set_cpu_tuning
    with pytest.raises(ValueError, match="path must be one of"):
        set_cpu_tuning(path="fast")
    with pytest.raises(ValueError, match="block_rows must be"):
        set_cpu_tuning(block_rows=-1)


# --- the eager route, trainable W, dropout streams ------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_route_equals_the_operator(backend, p):
    """Eager training calls run the operator bodies behind a plain autograd.Function; the registered
    operator (what torch.compile sees) gives the same output, the same dropout masks and the same
    gradients of every input (x, W, b, A, B, α)."""
    from petal_fast.ops.petal_linear.library import EagerPetalLinear, fused_petal_linear
    x, w, b, a, bb, alpha = make_inputs((5, 4), 12, 9, 3, 5)
    seed = torch.tensor([987])
    dy = torch.randn(20, 9)
    results = []
    for route in ("eager", "operator"):
        ins = [t.detach().clone().requires_grad_() for t in (x.reshape(20, 12), w, b, a, bb, alpha)]
        args = (*ins, 0.8, p, seed, 7)
        y = EagerPetalLinear.apply(*args, backend) if route == "eager" else fused_petal_linear(*args, backend)[0]
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in ins])
    for got, expect in zip(*results):
        torch.testing.assert_close(got, expect, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_trainable_weight_and_bias_get_their_gradients(backend, p):
    """A base W / b that require grad (an unfrozen base) get dW = dyᵀx and db = Σ dy on every backend:
    against the float64 reference's autograd, and gradcheck in float64 — never a silent zero."""
    x, w, b, a, bb, alpha = make_inputs((3, 4), 10, 7, 2, 3, dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in (x, w, b, a, bb, alpha)]
    ref_ins = [t.clone().requires_grad_() for t in (x, w, b, a, bb, alpha)]
    dy = torch.randn(3, 4, 7, dtype=torch.float64)
    with use_backend(backend):
        petal_linear(*ins, 0.6, p, 42, 3).backward(dy)
    ref_petal_linear(*ref_ins, 0.6, p, 42, 3).backward(dy)
    for name, got, expect in zip(("x", "W", "b", "A", "B", "alpha"), ins, ref_ins):
        assert got.grad is not None and rel_err(got.grad, expect.grad) < 1e-10, name
    with use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: petal_linear(*t, 0.6, p, 42, 3), ins, eps=1e-6, atol=1e-6)


def test_streams_draw_different_masks_and_match_the_reference():
    """Layers that share a seed draw different masks (their streams); stream 0 is the seed's own stream;
    every backend draws the reference's masks for any stream."""
    from petal_fast.definitions.dropout import stream_seed
    assert stream_seed(1234, 0) == 1234 and stream_seed(1234, 5) != 1234
    assert torch.equal(dropout_mask(1234, 0, 6, 9, 0.5, stream=0), dropout_mask(1234, 0, 6, 9, 0.5))
    assert not torch.equal(dropout_mask(1234, 0, 6, 9, 0.5, stream=1), dropout_mask(1234, 0, 6, 9, 0.5, stream=2))
    assert torch.equal(stream_seed(torch.tensor([1234]), 5), torch.tensor([stream_seed(1234, 5)]))
    x, w, b, a, bb, alpha = make_inputs((4, 3), 16, 11, 3, 4, dtype=torch.float64)
    for stream in (0, 1, 2**31 - 1):
        expect = ref_petal_linear(x, w, b, a, bb, alpha, 0.5, 0.4, 77, stream)
        for backend in CPU_BACKENDS:
            with use_backend(backend):
                got = petal_linear(x, w, b, a, bb, alpha, 0.5, 0.4, torch.tensor([77]), stream)
            assert rel_err(got, expect) < 1e-12, (backend, stream)
    with pytest.raises(ValueError, match="stream"):
        stream_seed(1, -1)


def test_layers_in_one_scope_share_a_seed_but_not_their_masks():
    """Inside an alpha_scope the layers with dropout share one seed drawn once (on x's device), each
    layer hashing it with its own stream; a layer called twice gets a fresh seed."""
    torch.manual_seed(0)
    layers = [PetalLinear(8, 8, rank=2, dropout=0.5) for _ in range(2)]
    for layer in layers:
        with torch.no_grad():
            layer.lora_B.normal_()
    assert layers[0].stream != layers[1].stream
    x, alpha = torch.randn(4, 8), torch.rand(4)
    with petal_fast.alpha_scope(alpha) as scope:
        s0 = scope.seed(layers[0].stream, x.device)
        assert torch.equal(scope.seed(layers[1].stream, x.device), s0)   # one draw for the block
        assert scope.seed(layers[0].stream, x.device) is not s0          # the same layer again: fresh
    for layer in layers[1:]:  # identical parameters: only the streams tell the layers apart
        layer.load_state_dict(layers[0].state_dict())
    calls = []
    real = torch.randint
    with petal_fast.alpha_scope(alpha) as scope, pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "randint", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
        y0, y1 = layers[0](x), layers[1](x)
        seed = int(scope._seed)
    assert len(calls) == 1 and not torch.equal(y0, y1)
    for layer, y in zip(layers, (y0, y1)):
        expect = ref_petal_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, alpha, 1.0, 0.5, seed,
                                  layer.stream)
        torch.testing.assert_close(y, expect)


def test_torch_func_transforms_say_what_to_use():
    """torch.func over the fused op: one clear error pointing to the reference backend, which supports it."""
    x, w, b, a, bb, alpha = make_inputs((3, 2), 8, 5, 2, 3)
    fn = lambda a_: petal_linear(x, w, b, a_, bb, alpha, 0.5).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="use_backend\\('reference'\\)"):
        torch.func.grad(fn)(a)
    with use_backend("reference"):
        g = torch.func.grad(fn)(a)
    a_ = a.clone().requires_grad_()
    fn(a_).backward()
    torch.testing.assert_close(g, a_.grad)
