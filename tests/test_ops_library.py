"""The fused ops as PyTorch operators: ``torch.library.opcheck`` per op and backend (dense permuted
layouts included), and the rules every backend shares — dα, double backward, empty batches."""
from __future__ import annotations

import pytest
import torch

import petal_fast
from conftest import rel_err, triton_interpreter_ok
from petal_fast.ops.petal_linear import petal_linear
from petal_fast.ops.margin_loss import margin_loss
from petal_fast.quality import brisque as _registers_fused_brisque  # noqa: F401
from petal_fast.reference import margin_loss as ref_margin
from petal_fast.reference import petal_linear as ref_petal_linear

BACKENDS = ["cpp", "torch"] + (["triton"] if triton_interpreter_ok() else [])
ALL_BACKENDS = BACKENDS + ["reference"]
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values in a dense but permuted (column-major) layout."""
    return t.t().contiguous().t() if t.dim() == 2 else t.transpose(0, -1).contiguous().transpose(0, -1)


def linear_inputs(m: int = 12, k: int = 16, n: int = 20, r: int = 2, images: int = 3, grad: bool = True):
    """x, W, b, A (2, r, k), B (2, n, r), α: the operator's tensor inputs (the layer's parameters as they are)."""
    x = torch.randn(m, k)
    w, b = torch.randn(n, k) / 4, torch.randn(n)
    lora_a, lora_b = torch.randn(2, r, k) / 4, torch.randn(2, n, r) / 4
    alpha = torch.rand(images)
    if grad:
        for t in (x, w, b, lora_a, lora_b, alpha):
            t.requires_grad_()
    return x, w, b, lora_a, lora_b, alpha


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_opcheck_petal_linear(backend, p):
    op = torch.ops.petal_fast.fused_petal_linear.default
    x, w, b, lora_a, lora_b, alpha = linear_inputs()
    seed = torch.tensor([11])
    args = (x, w, b, lora_a, lora_b, alpha, 0.7, p, seed, 3, backend, False)
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)
    y, u = op(*args)
    for i in (0, 1, 2, 3, 4, 5):  # each tensor input in a dense permuted layout gives the same numbers
        permuted = list(args)
        permuted[i] = column_major(args[i].detach()).requires_grad_(args[i].requires_grad)
        torch.library.opcheck(op, tuple(permuted), test_utils=("test_faketensor",))
        torch.testing.assert_close(op(*permuted)[0], y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_petal_linear_backward(backend):
    op = torch.ops.petal_fast.fused_petal_linear_backward.default
    x, w, b, lora_a, lora_b, alpha = linear_inputs(grad=False)
    seed = torch.tensor([3])
    _, u = torch.ops.petal_fast.fused_petal_linear(x, w, b, lora_a, lora_b, alpha, 0.7, 0.1, seed, 5, backend)
    dy = torch.randn(x.shape[0], w.shape[0])
    for need in ((True, True, True, True), (False, False, False, False)):
        args = (dy, x, w, lora_a, lora_b, alpha, u, 0.7, 0.1, seed, 5, *need, backend)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(op, (column_major(dy), column_major(x), *args[2:]), test_utils=("test_faketensor",))


def margin_inputs(b: int = 6, d: int = 8, c: int = 37):
    e = torch.randn(b, d, requires_grad=True)
    w = torch.randn(c, d, requires_grad=True)
    return e, w, torch.randint(0, c, (b,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_margin_loss_core(backend):
    op = torch.ops.petal_fast.fused_margin_loss.default
    e, w, labels = margin_inputs()
    args = (e, w, labels, 16.0, backend, True)
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)
    for permuted in ((column_major(e.detach()).requires_grad_(), w), (e, column_major(w.detach()).requires_grad_())):
        torch.library.opcheck(op, (*permuted, labels, 16.0, backend, True), test_utils=("test_faketensor",))
        torch.testing.assert_close(op(*permuted, labels, 16.0, backend)[0], op(*args)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_brisque(backend):
    op = torch.ops.petal_fast.fused_brisque.default
    images = torch.rand(2, 3, 16, 20)
    for features in (True, False):
        torch.library.opcheck(op, (images, features, backend), test_utils=("test_schema", "test_faketensor"))
    torch.testing.assert_close(op(images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), True, backend),
                               op(images, True, backend))


def test_opcheck_raw_cpp_kernels():
    """The C++ kernels registered by csrc/ have fake implementations too (they trace when called directly)."""
    x, w, b, lora_a, lora_b, alpha = linear_inputs(grad=False)
    torch.library.opcheck(torch.ops.petal_fast.petal_linear_fwd.default, (x, w, b, lora_a, lora_b, alpha, 0.7, 0.0, 0),
                          test_utils=("test_schema", "test_faketensor"))
    y, u = torch.ops.petal_fast.petal_linear_fwd(x, w, b, lora_a, lora_b, alpha, 0.7, 0.0, 0)
    torch.library.opcheck(torch.ops.petal_fast.petal_linear_bwd.default,
                          (torch.randn_like(y), x, w, lora_a, lora_b, alpha, 0.7, u, 0.1, 3, True),
                          test_utils=("test_schema", "test_faketensor"))
    e, w, labels = (t.detach() for t in margin_inputs())
    torch.library.opcheck(torch.ops.petal_fast.margin_loss_fwd.default, (e, w, labels, 16.0, 1e-5),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.petal_fast.brisque_moments.default, (torch.rand(2, 1, 16, 16), 2),
                          test_utils=("test_schema", "test_faketensor"))


# --- rules shared by every backend -------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_alpha_gradient_on_every_backend(backend, p):
    """α passed with requires_grad gets dα = s·Σ (branch_hr − branch_lr)·dy over its image's rows, the
    same on every backend (float64 reference, dropout included)."""
    x, w, b = torch.randn(4, 5, 16), torch.randn(12, 16), torch.randn(12)
    la, lb = torch.randn(2, 3, 16), torch.randn(2, 12, 3)
    alpha = torch.rand(4, requires_grad=True)
    with petal_fast.use_backend(backend):
        y = petal_linear(x, w, b, la, lb, alpha, 0.8, p, 21)
    g = torch.randn_like(y)
    (d_alpha,) = torch.autograd.grad(y, alpha, g)
    x64, w64, b64, la64, lb64 = (t.double() for t in (x, w, b, la, lb))
    branch = [(x64 @ la64[k].T) @ lb64[k].T for k in (0, 1)]
    if p:
        from petal_fast.ops import dropout_mask
        branch = [br * dropout_mask(21, k, 20, 12, p, dtype=torch.float64).view(4, 5, 12) for k, br in enumerate(branch)]
    expect = 0.8 * ((branch[1] - branch[0]) * g.double()).sum((1, 2))
    assert rel_err(d_alpha, expect) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises_on_fused_backends(backend):
    x = torch.randn(6, 8, requires_grad=True)
    w, la, lb = torch.randn(5, 8), torch.randn(2, 2, 8, requires_grad=True), torch.randn(2, 5, 2, requires_grad=True)
    e, cw, labels = margin_inputs()
    with petal_fast.use_backend(backend):
        y = petal_linear(x, w, None, la, lb, torch.rand(3), 1.0)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            gx.sum().backward()
        loss = margin_loss(e, cw, labels, scale=16.0)
        (ge,) = torch.autograd.grad(loss, e, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward is not supported"):
            ge.sum().backward()


def test_double_backward_is_exact_on_reference():
    """The reference backend is plain autograd: second derivatives are those of the formula."""
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64)
    la, lb = torch.randn(2, 2, 8, dtype=torch.float64), torch.randn(2, 5, 2, dtype=torch.float64)
    alpha = torch.rand(3, dtype=torch.float64)
    with petal_fast.use_backend("reference"):
        torch.autograd.gradgradcheck(lambda t: petal_linear(t, w, None, la, lb, alpha, 1.0).pow(2), (x,))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batches(backend):
    """0 rows / 0 images: correctly shaped empty outputs and gradients from every op, no kernel launched."""
    w, b = torch.randn(12, 16), torch.randn(12)
    la, lb = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 12, 3, requires_grad=True)
    with petal_fast.use_backend(backend):
        for x, alpha in ((torch.randn(0, 7, 16), torch.rand(0)), (torch.randn(4, 0, 16), torch.rand(4))):
            x.requires_grad_()
            y = petal_linear(x, w, b, la, lb, alpha, 1.0, 0.1, 3)
            assert y.shape == (*x.shape[:-1], 12)
            gx, ga, gb = torch.autograd.grad(y.sum(), (x, la, lb))
            assert gx.shape == x.shape and torch.equal(ga, torch.zeros_like(la)) and torch.equal(gb, torch.zeros_like(lb))
        e, cw = torch.randn(0, 8, requires_grad=True), torch.randn(9, 8, requires_grad=True)
        labels = torch.zeros(0, dtype=torch.int64)
        loss = margin_loss(e, cw, labels, scale=16.0, reduction="none")
        assert loss.shape == (0,)
        ge, gw = torch.autograd.grad(margin_loss(e, cw, labels, scale=16.0, reduction="sum"), (e, cw))
        assert ge.shape == (0, 8) and torch.equal(gw, torch.zeros_like(cw))
        from petal_fast.quality import brisque
        from petal_fast.quality.brisque import brisque_features
        assert brisque(torch.rand(0, 3, 16, 16)).shape == (0,)
        assert brisque_features(torch.rand(0, 1, 16, 16)).shape == (0, 36)


def test_margin_reference_empty_matches_fused_convention():
    """The reference margin loss agrees on an empty batch (mean of nothing is NaN, as torch's mean)."""
    e, w = torch.randn(0, 8), torch.randn(9, 8)
    labels = torch.zeros(0, dtype=torch.int64)
    fused = margin_loss(e, w, labels, scale=16.0)
    expect = ref_margin.margin_loss(e, w, labels, "cosface", ref_margin.resolve_margins("cosface", None), 16.0)
    assert fused.isnan() and expect.isnan()


def test_reference_petal_linear_empty():
    y = ref_petal_linear(torch.randn(0, 16), torch.randn(12, 16), None, torch.randn(2, 3, 16), torch.randn(2, 12, 3),
                         torch.rand(0), 1.0)
    assert y.shape == (0, 12)


def test_inference_mode_first_then_training():
    """Tensors cached by a first call in inference mode (the unused-seed tensor) can be saved for a later backward."""
    from petal_fast.ops import _graph
    _graph.unused_seed.cache_clear()
    layer, lora = petal_fast.PetalLinear(8, 6, rank=2), petal_fast.PetalLinear(8, 6, rank=2, branches=1)
    x, alpha = torch.randn(4, 3, 8), torch.rand(4)
    with torch.inference_mode():
        layer(x, alpha=alpha), lora(x)
    (layer(x, alpha=alpha).sum() + lora(x).sum()).backward()
    assert layer.lora_A.grad is not None and lora.lora_B.grad is not None


# which of each backend's two functions exist: PetalLinear and the margin loss (forward, backward),
# BRISQUE (moments, score: the C++ op runs the whole pipeline, the others the fused stage only)
PAIRS = {"petal_linear": {"torch": (1, 1), "cpp": (1, 1)}, "margin_loss": {"torch": (1, 1), "cpp": (1, 1)},
         "brisque": {"torch": (1, 0), "cpp": (0, 1)}}


@pytest.mark.parametrize("op", sorted(PAIRS))
def test_each_op_has_one_backend_table(op):
    """ops/<op>/backends.py maps every non-reference backend to the op's pair of functions, built once."""
    import importlib
    from petal_fast import _ext, backend
    table = importlib.import_module(f"petal_fast.ops.{op}.backends")
    assert set(table.BACKENDS) == set(backend.BACKENDS) - {"reference"}
    for name, present in PAIRS[op].items():
        if name == "cpp" and not _ext.has_op("petal_linear_fwd"):
            continue
        pair = table.implementation(name)
        assert tuple(int(callable(f)) for f in pair) == present and table.implementation(name) is pair
