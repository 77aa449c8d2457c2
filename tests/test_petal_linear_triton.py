"""The Triton PetalLinear launchers (kernels/petal_linear.py) against the float64 reference.

On a machine without CUDA they run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), on tiny shapes; with CUDA the same tests run natively, and the
``@pytest.mark.gpu`` tests add bfloat16 and large shapes (``pytest -m gpu``). Every numerical case
runs both designs (split, one-pass) and both main loops: the pointer kernels (the interpreter's
table) and the Hopper TMA kernels (a table of the same tiny tiles with ``TMA=1``, whose tensor
descriptors the 3.9 interpreter runs).

The launchers are called directly: ``forward(x, W, b, lora_A, lora_B, α, s, p, seed, stream)`` and
``backward(dY, x, W, lora_A, lora_B, α, U, s, p, seed, stream, need_x)``. The reference has no
stream: stream 0 is compared with it directly, a stream ≠ 0 through the seed' it stands for,
seed' = (seed ^ mix(stream)) & 0x7FFFFFFF (``seed_prime`` below, in torch/Python integers).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from petal_fast.definitions.dropout import mix32
from petal_fast.kernels import petal_linear as kernels
from petal_fast.kernels import petal_linear_config as config
from conftest import HAS_CUDA, TOL, rel_err, triton_interpreter_ok
from petal_fast.reference import petal_linear as reference_petal_linear
from petal_fast.reference.rng import dropout_mask

INTERPRETER = pytest.mark.skipif(not triton_interpreter_ok(), reason="needs TRITON_INTERPRET=1")
DEVICES = [
    pytest.param("cpu", marks=INTERPRETER),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]
DESIGNS = list(kernels.DESIGNS)


def tma_table(base: dict) -> dict:
    """``base`` with its TMA kernels' rungs on the Hopper TMA kernels (same tiles; the forward
    stores its tile in two column halves, so the split epilogue runs too)."""
    return {kernel: {name: dict(cfg, TMA=1, EPI_SPLIT=2, FLATTEN=0) if kernel in kernels.TMA_KERNELS else cfg
                     for name, cfg in rungs.items()} for kernel, rungs in base.items()}


# The main loops: None is the device's own table (the pointer kernels in the interpreter).
PATHS = {"pointer": None, "tma": tma_table(config.TILE_CONFIGS["interpreter"])}


def seed_prime(seed: int, stream: int) -> int:
    """seed' of (seed, stream): the seed whose stream-0 masks are the masks of ``stream``."""
    return (seed ^ mix32(stream)) & 0x7FFFFFFF


def make(m, k, n, rank, branches, dtype, device, *, images=None, bias=True, alpha="random"):
    """Random layer and input (float64 masters and their ``dtype`` copies); the LoRA term is as large
    as the base term so mask errors show."""
    x = torch.randn(m, k, dtype=torch.float64)
    w = torch.randn(n, k, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, dtype=torch.float64) if bias else None
    lora_a = torch.randn(branches, rank, k, dtype=torch.float64) / k ** 0.5
    lora_b = torch.randn(branches, n, rank, dtype=torch.float64) / rank ** 0.5
    al = None
    if branches == 2:
        images = images or m
        al = {"random": torch.rand(images), "zero": torch.zeros(images), "one": torch.ones(images)}[alpha]
        al = al.to(device)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(lora_a), cast(lora_b), al


def run(x, w, b, lora_a, lora_b, alpha, scale, p, seed, stream, dy, *, need_x=True, design="split", table=None):
    """(y, U, dX, dA, dB) of the launchers."""
    seed_t = torch.tensor([seed], device=x.device)
    with kernels.use_design(design):
        y, u = kernels.forward(x, w, b, lora_a, lora_b, alpha, scale, p, seed_t, stream, table=table)
        dx, da, db = kernels.backward(dy.to(x.dtype), x, w, lora_a, lora_b, alpha, u, scale, p, seed_t, stream,
                                      need_x, table=table)
    return y, u, dx, da, db


def check(x, w, b, lora_a, lora_b, alpha, scale, p, seed, *, stream=0, need_x=True, design="split", table=None):
    """Forward, U and every gradient of the launchers against the float64 reference (same masks)."""
    dtype = x.dtype
    x64, la64, lb64 = (t.detach().double().requires_grad_() for t in (x, lora_a, lora_b))
    y64 = reference_petal_linear(x64, w.double(), None if b is None else b.double(), la64, lb64,
                                 None if alpha is None else alpha.double(), scale, p, seed_prime(seed, stream))
    dy = torch.randn_like(y64)
    y64.backward(dy)
    y, u, dx, da, db = run(x, w, b, lora_a, lora_b, alpha, scale, p, seed, stream, dy, need_x=need_x,
                           design=design, table=table)
    u64 = x64.detach() @ la64.detach().reshape(-1, x.shape[1]).T
    assert y.dtype == dtype and y.shape == y64.shape and u.shape == u64.shape
    assert rel_err(y, y64) < TOL[dtype], "forward"
    assert rel_err(u, u64) < TOL[dtype], "U"
    assert (dx is None) == (not need_x)
    if need_x:
        assert dx.dtype == dtype and rel_err(dx, x64.grad) < TOL[dtype], "dx"
    for got, param, want, name in ((da, lora_a, la64.grad, "dA"), (db, lora_b, lb64.grad, "dB")):
        assert got.shape == param.shape and got.dtype == param.dtype and got.is_contiguous(), name
        assert rel_err(got, want) < TOL[dtype], name


# (rows, in, out, rank, branches, images, alpha, p, bias)
CASES = {
    "base": (40, 48, 40, 4, 2, 8, "random", 0.0, True),
    "dropout": (40, 48, 40, 4, 2, 8, "random", 0.25, True),
    "rank1_alpha0_odd": (33, 40, 35, 1, 2, 33, "zero", 0.1, True),   # N odd: TMA falls back to pointers
    "rank16_alpha1": (29, 24, 40, 16, 2, 1, "one", 0.0, True),
    "m1": (1, 48, 37, 4, 2, 1, "random", 0.1, True),
    "tokens": (36, 24, 32, 4, 2, 4, "random", 0.3, True),           # 4 images × 9 tokens
    "one_branch_no_bias": (40, 48, 40, 8, 1, None, "random", 0.1, False),
    "rank64": (20, 32, 32, 64, 2, 5, "random", 0.2, True),
    "many_rows": (75, 24, 40, 4, 2, 15, "random", 0.1, True),       # dY pass without the N-split
}
FP16_CASES = ("base", "dropout", "tokens", "one_branch_no_bias")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in CASES] + [(c, torch.float16) for c in FP16_CASES])
def test_forward_backward(case, dtype, device, design, path):
    m, k, n, rank, branches, images, alpha, p, bias = CASES[case]
    args = make(m, k, n, rank, branches, dtype, device, images=images, bias=bias, alpha=alpha)
    check(*args, scale=0.7, p=p, seed=int(torch.randint(0, 2**31 - 1, ())), design=design, table=PATHS[path])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.15])
def test_no_input_grad(device, p, path):
    """need_x False: the dX GEMM is skipped (dX None), dA/dB still exact."""
    args = make(21, 40, 24, 4, 2, torch.float32, device, images=3)
    check(*args, scale=1.3, p=p, seed=11, need_x=False, table=PATHS[path])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
def test_parameters_in_any_strides(device, path):
    """lora_A stored transposed, lora_B a slice of a bigger buffer, W a slice of a wider weight: read
    through their strides; the gradients still come back contiguous in the parameters' layout."""
    x, w, b, la, lb, al = make(30, 32, 24, 4, 2, torch.float32, device, images=5)
    la_t = la.transpose(1, 2).contiguous().transpose(1, 2)             # (2, 4, 32), K-major storage
    big = torch.randn(3, 30, 9, device=device)
    big[:2, 3:27, 2:6] = lb
    lb_s = big[:2, 3:27, 2:6]                                          # (2, 24, 4), a view with odd strides
    w_wide = torch.randn(24, 40, device=device)
    w_wide[:, :32] = w
    w_s = w_wide[:, :32]                                               # row stride 40
    assert not (la_t.is_contiguous() or lb_s.is_contiguous() or w_s.is_contiguous())
    for design, p in (("split", 0.2), ("onepass", 0.0)):
        check(x, w_s, b, la_t, lb_s, al, scale=0.5, p=p, seed=3, design=design, table=PATHS[path])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("design", DESIGNS)
def test_stream_selects_the_seed_prime_masks(device, design, path):
    """With W = 0 and one branch weighted in, y's zeros are that branch's dropped elements: stream 0
    draws the reference masks of ``seed``, stream s those of seed' = (seed ^ mix(s)) & 0x7FFFFFFF;
    the backward of a stream ≠ 0 matches the reference at seed'."""
    m, k, n, rank, p, seed = 37, 16, 44, 4, 0.4, 2**31 - 5
    x, w, _, la, lb, _ = make(m, k, n, rank, 2, torch.float32, device)
    seed_t = torch.tensor([seed], device=device)
    for stream in (0, 1, 977, 2**31 - 1):
        for branch in (0, 1):
            alpha = torch.full((m,), float(branch), device=device)  # α = 0 keeps branch 0 only, α = 1 branch 1
            with kernels.use_design(design):
                y, _ = kernels.forward(x, torch.zeros_like(w), None, la, lb, alpha, 1.0, p, seed_t, stream,
                                       table=PATHS[path])
            mask = dropout_mask(seed_prime(seed, stream), branch, m, n, p, device=device)
            product = (x @ la[branch].T) @ lb[branch].T
            assert torch.equal(y != 0, mask != 0), (stream, branch)
            assert rel_err(y, product * mask) < TOL[torch.float32]
    masks = [dropout_mask(seed_prime(seed, s), 0, m, n, p) for s in (0, 1, 977)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    args = make(24, 16, 20, 4, 2, torch.float32, device, images=4)
    check(*args, scale=0.9, p=0.3, seed=seed, stream=977, design=design, table=PATHS[path])


@INTERPRETER
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 70), k=st.integers(1, 56), n=st.integers(1, 56), rank=st.sampled_from([1, 3, 8, 16]),
       branches=st.sampled_from([1, 2]), p=st.sampled_from([0.0, 0.3]), design=st.sampled_from(DESIGNS),
       path=st.sampled_from(list(PATHS)), transposed_a=st.booleans(), bias=st.booleans(),
       stream=st.integers(0, 2**31 - 1), need_x=st.booleans())
def test_any_shape_and_layout(m, k, n, rank, branches, p, design, path, transposed_a, bias, stream, need_x):
    """Random shapes (K, N not multiples of anything: TMA falls back where rows are not 16-byte
    strides), ranks, one or two branches, stored layouts of lora_A, bias, stream, dX wanted or not."""
    images = next(i for i in (4, 3, 2, 1) if m % i == 0)
    x, w, b, la, lb, al = make(m, k, n, rank, branches, torch.float32, "cpu", images=images, bias=bias)
    if transposed_a:
        la = la.transpose(1, 2).contiguous().transpose(1, 2)
    check(x, w, b, la, lb, al, scale=0.6, p=p, seed=4321, stream=stream, need_x=need_x, design=design,
          table=PATHS[path])


@pytest.mark.parametrize("device", DEVICES)
def test_triton_hash_matches_reference(device):
    from petal_fast.kernels import _rng

    for seed, branch, p, offset, stream in ((0, 0, 0.1, 0, 0), (12345, 1, 0.5, 7, 0), (2**31 - 1, 0, 0.9, 3, 5),
                                            (77, 1, 0.0, 0, 2**31 - 1), (9, 1, 0.3, 2, 123456)):
        got = _rng.dropout_mask(seed, branch, 45, 70, p, stream=stream, row_offset=offset, device=device)
        want = dropout_mask(seed_prime(seed, stream), branch, 45, 70, p, row_offset=offset, device=device)
        assert torch.equal(got, want), (seed, branch, p, stream)
    with pytest.raises(ValueError, match="stream"):
        _rng.stream_mix(2**31)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("device", DEVICES)
def test_empty_in_or_out_features(device, path):
    """N = 0: y is (M, 0), U and dA = dTᵀ x still right (dT = 0), dX = 0. K = 0: U = 0, y = b."""
    for k, n in ((16, 0), (0, 12)):
        x, w, b, la, lb, al = make(20, k, n, 4, 2, torch.float32, device, images=4)
        for design, p in (("split", 0.1), ("onepass", 0.0)):
            dy = torch.randn(20, n, dtype=torch.float64)
            y, u, dx, da, db = run(x, w, b, la, lb, al, 0.5, p, 8, 3, dy, design=design, table=PATHS[path])
            assert y.shape == (20, n) and u.shape == (20, 8) and dx.shape == x.shape
            assert da.shape == la.shape and db.shape == lb.shape
            assert torch.allclose(u, x @ la.reshape(8, k).T, atol=1e-5)
            if n:
                assert torch.allclose(y, b.expand(20, n)) and torch.equal(u, torch.zeros_like(u))
                assert rel_err(db, torch.zeros_like(db)) == 0
            else:
                assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(da, torch.zeros_like(da))


@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_inputs_raise(device):
    x, w, b, la, lb, al = make(8, 16, 16, 4, 2, torch.float32, device, images=2)
    seed = torch.tensor([1], device=device)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        kernels.forward(x.double(), w.double(), b.double(), la.double(), lb.double(), al, 1.0, 0.0, seed, 0)
    big_a, big_b = torch.randn(2, 65, 16, device=device), torch.randn(2, 16, 65, device=device)
    with pytest.raises(ValueError, match="rank"):
        kernels.forward(x, w, b, big_a, big_b, al, 1.0, 0.0, seed, 0)
    with pytest.raises(ValueError, match="alpha"):
        kernels.forward(x, w, b, la, lb, None, 1.0, 0.0, seed, 0)
    with pytest.raises(ValueError, match="alpha"):
        kernels.forward(x, w, b, la, lb, torch.rand(3, device=device), 1.0, 0.0, seed, 0)
    with pytest.raises(ValueError, match="lora_B"):
        kernels.forward(x, w, b, la, lb[:, :, :3], al, 1.0, 0.0, seed, 0)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.forward(x.t().contiguous().t(), w, b, la, lb, al, 1.0, 0.0, seed, 0)


# ------------------------------------------------------------------------------- launches and dispatch
class Launches:
    """A ``wrap`` that records each launch (kernel name, grid) instead of running it."""

    def __init__(self):
        self.log: list[tuple[str, tuple]] = []

    def __call__(self, kernel):
        name = kernel.fn.__name__
        return _Grid(self.log, name)


class _Grid:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.log.append((self.name, grid))
        return launch


class TorchOps(TorchDispatchMode):
    """The aten ops a call runs outside its kernel launches; allocations and views launch no CUDA kernel."""
    FREE = ("empty", "empty_like", "empty_strided", "slice", "view", "alias", "as_strided", "detach")

    def __init__(self):
        super().__init__()
        self.kernels: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not name.startswith(self.FREE):
            self.kernels.append(name)
        return func(*args, **(kwargs or {}))


@INTERPRETER
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_launch_budget(p, dtype, path):
    """Per call: forward = its Triton launches only (split 2, one-pass 1); backward = its Triton
    launches (≤ 3: dY pass, dX, the cast of the gradients) + one memset of the fp32 workspace."""
    x, w, b, la, lb, al = make(48, 32, 40, 4, 2, dtype, "cpu", images=6)
    seed = torch.tensor([5])
    u = torch.randn(48, 8).to(dtype)
    dy = torch.randn(48, 40).to(dtype)
    for design in DESIGNS:
        launches = Launches()
        with kernels.use_design(design):
            with TorchOps() as ops:
                kernels.forward(x, w, b, la, lb, al, 0.5, p, seed, 2, table=PATHS[path], wrap=launches)
            fwd = [name for name, _ in launches.log]
            assert ops.kernels == [], ops.kernels
            launches.log.clear()
            with TorchOps() as ops:
                kernels.backward(dy, x, w, la, lb, al, u, 0.5, p, seed, 2, True, table=PATHS[path], wrap=launches)
            bwd = [name for name, _ in launches.log]
        assert ops.kernels == ["zero_"], ops.kernels
        tma = path == "tma"
        fwd_kernel = "fwd_tma_kernel" if tma else "fwd_kernel"
        assert fwd == ([fwd_kernel] if design == "onepass" else ["shrink_kernel", fwd_kernel]), fwd
        if design == "onepass" and p == 0:
            main = ["bwd_onepass_kernel"]
        else:
            main = ["bwd_dy_kernel", "bwd_dx_tma_kernel" if tma else "bwd_dx_kernel"]
        # the dY pass splits N here (few rows), so dT shares the workspace: float32 is copied out too
        cast = dtype != torch.float32 or main[0] == "bwd_dy_kernel"
        assert bwd == main + ["finalize_kernel"] * cast, bwd


@INTERPRETER
def test_float32_gradients_without_a_cast():
    """float32 with dT outside the workspace: dA and dB are the workspace's halves, no cast launched."""
    x, w, b, la, lb, al = make(64, 32, 16, 4, 2, torch.float32, "cpu", images=4)  # 4 M-tiles ≥ 2 "SMs"·2
    launches = Launches()
    kernels.backward(torch.randn(64, 16), x, w, la, lb, al, torch.randn(64, 8), 0.5, 0.0, None, 0, True,
                     wrap=launches)
    assert [name for name, _ in launches.log] == ["bwd_dy_kernel", "bwd_dx_kernel"]
    check(x, w, b, la, lb, al, scale=0.5, p=0.0, seed=0)


@INTERPRETER
def test_plans_are_cached():
    """A second call with the same shapes reuses the plan (tiles, grids, launch keywords)."""
    x, w, b, la, lb, al = make(24, 16, 16, 4, 2, torch.float32, "cpu", images=3)
    kernels._forward_plans.clear()
    seed = torch.tensor([3])
    kernels.forward(x, w, b, la, lb, al, 0.5, 0.1, seed, 1)
    (plan,) = kernels._forward_plans.values()
    kernels.forward(x + 1, w, b, la, lb, al, 0.9, 0.1, seed, 7)
    assert list(kernels._forward_plans.values()) == [plan]
    kernels.forward(torch.randn(30, 16), w, b, la, lb, torch.rand(5), 0.5, 0.1, seed, 1)
    assert len(kernels._forward_plans) == 2


TRACE = """
import sys, torch
from torch import Tensor
from torch.library import triton_op, wrap_triton
from torch._dynamo.backends.common import aot_autograd
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from petal_fast.kernels import petal_linear as k

table = None

@triton_op("kernel_trace_test::fwd", mutates_args=())
def fwd(x: Tensor, w: Tensor, b: Tensor, la: Tensor, lb: Tensor, al: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    return k.forward(x, w, b, la, lb, al, 0.5, 0.25, s, 3, table=table, wrap=wrap_triton)

@triton_op("kernel_trace_test::bwd", mutates_args=())
def bwd(dy: Tensor, x: Tensor, w: Tensor, la: Tensor, lb: Tensor, al: Tensor, u: Tensor,
        s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return k.backward(dy, x, w, la, lb, al, u, 0.5, 0.25, s, 3, True, table=table, wrap=wrap_triton)

class Captured(Exception):
    pass

FREE = ("aten.empty", "aten.view", "aten.alias", "aten.sym_", "<built-in", "<function sym")

def launches(fn, *args):
    graphs = []
    def capture(gm, example_inputs):  # the graph Inductor would get; stop there (no GPU to run it)
        graphs.append(gm)
        raise Captured()
    try:
        torch.compile(fn, backend=aot_autograd(fw_compiler=capture), fullgraph=True)(*args)
    except Exception as err:
        assert "Captured" in str(err), err
    out = []
    for node in graphs[0].graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            out.append((kernel.fn.__name__, all(isinstance(g, int) for g in node.kwargs["grid"][0])))
        elif node.op == "call_function" and not str(node.target).startswith(FREE):
            out.append((str(node.target), None))  # anything but an allocation, a view or size arithmetic
    return out

m, kk, n, r = 48, 32, 40, 4
f16 = lambda *shape: torch.randn(*shape).to(torch.float16)
x, dy, w, b, u, al = f16(m, kk), f16(m, n), f16(n, kk), f16(n), f16(m, 2 * r), torch.rand(8)
la, lb = f16(2, r, kk), f16(2, n, r)
for t in (x, dy, u, al):
    torch._dynamo.mark_dynamic(t, 0)
for name in ("interpreter", 9):
    table = k.TILE_CONFIGS[name]
    for design in k.DESIGNS:
        with k.use_design(design):
            seed = torch.tensor([3])
            f = launches(lambda x, al, s: fwd(x, w, b, la, lb, al, s), x, al, seed)
            g = launches(lambda x, dy, u, al, s: bwd(dy, x, w, la, lb, al, u, s), x, dy, u, al, seed)
            print(repr((name, design, f, g)))
"""


def test_launchers_trace_with_a_dynamic_batch():
    """Under torch.compile (fullgraph, dynamic batch) inside a triton_op, the launchers become their
    kernel launches with grids symbolic in the batch — the TMA kernels too (descriptor stores are
    seen as writes) — plus the one workspace memset in backward; the cast's grid is static (R·(K + N)).
    Real JIT kernels (TRITON_INTERPRET=0), traced on fake tensors; p = 0.25, so backward is split."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0", "TORCH_LOGS": "-dynamo"}
    proc = subprocess.run([sys.executable, "-c", TRACE], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [eval(line) for line in proc.stdout.strip().splitlines()]  # noqa: S307  (our own subprocess's repr)
    assert len(rows) == 4
    for table, design, fwd, bwd in rows:
        tma = "_tma" if table == 9 else ""
        assert fwd == ([] if design == "onepass" else [("shrink_kernel", False)]) + [(f"fwd{tma}_kernel", False)]
        assert bwd == [("aten.zero.default", None), ("bwd_dy_kernel", False), (f"bwd_dx{tma}_kernel", False),
                       ("finalize_kernel", True)]


def test_design_selection(monkeypatch):
    from petal_fast import settings
    cpu = torch.device("cpu")
    with settings.override(triton_design=None):  # whatever the shell set: the generation's default
        for direction in kernels.DIRECTIONS:
            assert kernels.design_for(cpu, direction) == kernels.DEFAULT_DESIGN["interpreter"][direction]
        monkeypatch.setitem(kernels.DEFAULT_DESIGN, "interpreter", {"fwd": "onepass", "bwd": "split"})
        assert (kernels.design_for(cpu, "fwd"), kernels.design_for(cpu, "bwd")) == ("onepass", "split")
        # the triton_design setting (PETAL_FAST_TRITON_DESIGN), which the op passes to the launchers
        assert kernels.design_for(cpu, "bwd", "onepass") == "onepass"
        with kernels.use_design("split"):  # the context wins over the setting, and nests
            assert kernels.design_for(cpu, "fwd", "onepass") == "split"
            with kernels.use_design("onepass"):
                assert kernels.design_for(cpu, "bwd", "split") == "onepass"
            assert kernels.design_for(cpu, "bwd", "onepass") == "split"
        assert kernels.design_for(cpu, "bwd") == "split"
        with pytest.raises(ValueError, match="design must be one of"):
            kernels.design_for(cpu, "fwd", "fastest")
    with pytest.raises(ValueError, match="triton_design .PETAL_FAST_TRITON_DESIGN."):
        settings.configure(triton_design=" fastest ")
    with pytest.raises(ValueError, match="design must be one of"):
        with kernels.use_design("fastest"):
            pass
    for generation, designs in kernels.DEFAULT_DESIGN.items():
        assert set(designs) == set(kernels.DIRECTIONS) and set(designs.values()) <= set(kernels.DESIGNS)
    assert set(kernels.DEFAULT_DESIGN) == set(kernels.TILE_CONFIGS)


# ------------------------------------------------------------------------------------------ tile tables
def test_tile_table_is_complete():
    """Every generation names a ladder of legal tiles for every kernel; float32 halves the reduction block."""
    for generation, table in kernels.TILE_CONFIGS.items():
        assert set(kernels.KERNELS) <= set(table), generation
        assert all(k.removesuffix("_dropout") in kernels.KERNELS for k in table), generation
        for name, rungs in table.items():
            assert rungs, (generation, name)
            for rung, cfg in rungs.items():
                assert {"num_warps", "num_stages", "BLOCK_M"} <= set(cfg), (generation, name, rung)
                for key, value in cfg.items():
                    if key.startswith("BLOCK_"):
                        assert value >= 16 and value & (value - 1) == 0, (generation, name, rung, key)
                assert not cfg.get("TMA") or name.removesuffix("_dropout") in kernels.TMA_KERNELS
    hopper = kernels.TILE_CONFIGS[9]["fwd"]["128x256"]
    half = config.tiles(hopper, "fwd", torch.float32)
    assert half["BLOCK_K"] == hopper["BLOCK_K"] // 2 and half["BLOCK_M"] == hopper["BLOCK_M"] // 2
    assert config.tiles(hopper, "fwd", torch.float32, tma=True)["BLOCK_M"] == hopper["BLOCK_M"]
    assert config.tiles(hopper, "fwd", torch.bfloat16) == hopper
    cpu = torch.device("cpu")
    with_dropout = {**kernels.TILE_CONFIGS["default"], "fwd_dropout": {"small": dict(hopper, BLOCK_N=32)}}
    assert config.ladder("fwd", cpu, with_dropout, dropout=True)["small"]["BLOCK_N"] == 32
    assert config.ladder("fwd", cpu, with_dropout) == kernels.TILE_CONFIGS["default"]["fwd"]
    assert config.ladder("bwd_dx", cpu, with_dropout, dropout=True) == kernels.TILE_CONFIGS["default"]["bwd_dx"]


def fwd_rung(m: int, k: int, n: int, dropout: bool = False) -> str:
    rungs = config.ladder("fwd", None, kernels.TILE_CONFIGS[9], dropout)
    chosen = config.choose("fwd", rungs, m, n, 132)
    return next(name for name, cfg in rungs.items() if cfg is chosen)


def test_hopper_ladder_fills_the_gpu():
    """The Hopper rungs chosen on 132 SMs: large problems keep the largest tile (one persistent wave
    of 132 programs instead of 7.8 waves of CTAs), the PETALface batch-8 shapes get smaller tiles
    instead of leaving most SMs idle, and the bandwidth passes get enough programs."""
    assert fwd_rung(8192, 4096, 4096) == "128x256"
    assert fwd_rung(25600, 768, 2304) == "128x256" and fwd_rung(25600, 768, 2304, dropout=True) == "128x128"
    for m, k, n in ((200, 384, 1152), (400, 768, 768), (800, 384, 384)):  # 10–14 tiles of 128 × 256
        rung = kernels.TILE_CONFIGS[9]["fwd"][fwd_rung(m, k, n)]
        assert -(-m // rung["BLOCK_M"]) * -(-n // rung["BLOCK_N"]) >= 24, (m, k, n)
    for m in (1600, 3200):
        cfg = config.choose("shrink", kernels.TILE_CONFIGS[9]["shrink"], m, 0, 132)
        assert -(-m // cfg["BLOCK_M"]) >= 100, m
    cfg = config.choose("shrink", kernels.TILE_CONFIGS[9]["shrink"], 25600, 0, 132)
    assert cfg["BLOCK_M"] == 64


@pytest.mark.parametrize("generation", [9, 8])
@INTERPRETER
def test_gpu_tiles_in_interpreter(generation):
    """A GPU table's (large) tiles through the launchers on shapes smaller and larger than one tile —
    on Hopper the TMA kernels with their real tiles, persistent over 2 "SMs"."""
    table = kernels.TILE_CONFIGS[generation]
    args = make(150, 40, 136, 4, 2, torch.float32, "cpu", images=10)
    for design, p in (("split", 0.2), ("onepass", 0.0)):
        check(*args, scale=0.8, p=p, seed=5, stream=3, design=design, table=table)


@INTERPRETER
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_tune_picks_fastest_tiles_and_design(p, monkeypatch):
    """The re-tuning search with a fake timer (per launched kernel, from the plans the calls make): it
    keeps each kernel's fastest candidate and picks, per direction, the design whose call takes less."""
    small = kernels.TILE_CONFIGS["interpreter"]
    candidates = {name: [cfg, {**cfg, "num_warps": 8}] for name, rungs in small.items() for cfg in rungs.values()}
    launched: list[tuple[str, int]] = []
    for maker in ("_forward_plan", "_backward_plan"):
        real = getattr(kernels, maker)

        def spy(*args, _real=real, **kw):
            plan = _real(*args, **kw)
            for launch in plan:
                if isinstance(launch, kernels.Launch):
                    name = launch.kernel.fn.__name__.removesuffix("_kernel").removesuffix("_tma")
                    launched.append((name + ("_onepass" if launch.meta.get("ONEPASS") else ""),
                                     launch.meta.get("num_warps", 4)))
            return plan
        monkeypatch.setattr(kernels, maker, spy)
    fake_ms = {"shrink": 1.0, "fwd": 5.0, "fwd_onepass": 5.5, "bwd_dy": 2.0, "bwd_dx": 5.0, "bwd_onepass": 6.0,
               "finalize": 0.5}  # num_warps = 8 is 10% faster throughout

    def bench(fn):
        launched.clear()
        fn()  # the launches themselves must work
        return sum(fake_ms[name] * (0.9 if warps == 8 else 1.0) for name, warps in launched)

    from petal_fast.kernels import tune_petal_linear
    best, designs = tune_petal_linear.tune(40, 24, 40, rank=4, dtype=torch.float32, p=p, device="cpu",
                                 candidates=candidates, bench=bench)
    assert all(cfg["num_warps"] == 8 for cfg in best.values())
    assert designs["fwd"] == "onepass"  # 5.5 < 1 + 5
    assert designs["bwd"] == ("split" if p else "onepass")  # one-pass backward: p = 0 only; 6 < 2 + 5
    assert ("bwd_onepass" in best) == (p == 0)


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("design", DESIGNS)
def test_large_shapes_gpu(dtype, rank, p, design):
    args = make(4096, 1024, 1024, rank, 2, dtype, "cuda", images=64)
    check(*args, scale=0.5, p=p, seed=1234, stream=17, design=design)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_odd_shapes_gpu(dtype, design, p):
    for m, k, n, rank, branches in ((1, 384, 1152, 8, 2), (3136, 96, 288, 4, 2), (777, 1000, 1003, 64, 2),
                                    (200, 1536, 4608, 8, 1), (1600, 768, 2304, 8, 2)):
        args = make(m, k, n, rank, branches, dtype, "cuda", images=m)
        check(*args, scale=0.5, p=p, seed=99, stream=5, design=design)
