"""The Triton PetalLinear kernels (kernels/petal_linear.py) against the float64 reference.

On a machine without CUDA they run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), on tiny shapes; with CUDA the same tests run natively, and the
``@pytest.mark.gpu`` tests add bfloat16 and large shapes (``pytest -m gpu``). Both designs
(split and one-pass) run every numerical case.
"""
from __future__ import annotations

import pytest
import torch

import petal_fast
from petal_fast.kernels import petal_linear as kernels
from petal_fast.kernels import petal_linear_config as config
from conftest import HAS_CUDA, TOL, rel_err, triton_interpreter_ok
from petal_fast.ops import petal_linear
from petal_fast.reference import petal_linear as reference_petal_linear
from petal_fast.reference.rng import dropout_mask

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not triton_interpreter_ok(), reason="needs TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]


def make(m_shape, k, n, rank, branches, dtype, device, *, images=None, bias=True, alpha="random"):
    """Random layer and input; the LoRA term is as large as the base term so mask errors show."""
    x = torch.randn(*m_shape, k, dtype=torch.float64)
    w = torch.randn(n, k, dtype=torch.float64) / k ** 0.5
    b = torch.randn(n, dtype=torch.float64) if bias else None
    lora_a = torch.randn(branches, rank, k, dtype=torch.float64) / k ** 0.5
    lora_b = torch.randn(branches, n, rank, dtype=torch.float64) / rank ** 0.5
    al = None
    if branches == 2:
        images = images or m_shape[0]
        al = {"random": torch.rand(images), "zero": torch.zeros(images), "one": torch.ones(images)}[alpha]
        al = al.to(device)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(lora_a), cast(lora_b), al


DESIGNS = list(kernels.DESIGNS)


def check(x, w, b, lora_a, lora_b, alpha, scale, p, seed, *, x_grad=True, design="split"):
    """Forward and every gradient of the Triton op (``design``) against the float64 reference, same seed."""
    with kernels.use_design(design):
        _check(x, w, b, lora_a, lora_b, alpha, scale, p, seed, x_grad)


def _check(x, w, b, lora_a, lora_b, alpha, scale, p, seed, x_grad):
    dtype = x.dtype
    xs = x.detach().requires_grad_(x_grad)
    la, lb = lora_a.detach().requires_grad_(), lora_b.detach().requires_grad_()
    with petal_fast.use_backend("triton"):
        y = petal_linear(xs, w, b, la, lb, alpha, scale, p, seed)
    x64, la64, lb64 = (t.detach().double().requires_grad_() for t in (x, lora_a, lora_b))
    y64 = reference_petal_linear(x64, w.double(), None if b is None else b.double(), la64, lb64,
                                 None if alpha is None else alpha.double(), scale, p, seed)
    assert y.dtype == dtype and y.shape == y64.shape
    assert rel_err(y, y64) < TOL[dtype], "forward"
    dy = torch.randn_like(y64)
    y.backward(dy.to(dtype))
    y64.backward(dy)
    if x_grad:
        assert rel_err(xs.grad, x64.grad) < TOL[dtype], "dx"
    assert rel_err(la.grad, la64.grad) < TOL[dtype], "d lora_A"
    assert rel_err(lb.grad, lb64.grad) < TOL[dtype], "d lora_B"


# (rows shape, in, out, rank, branches, images, alpha, p, bias)
CASES = {
    "base": ((40,), 48, 40, 4, 2, 8, "random", 0.0, True),
    "dropout": ((40,), 48, 40, 4, 2, 8, "random", 0.25, True),
    "rank1_alpha0": ((33,), 40, 35, 1, 2, 33, "zero", 0.1, True),
    "rank16_alpha1": ((29,), 24, 40, 16, 2, 1, "one", 0.0, True),
    "m1": ((1,), 48, 37, 4, 2, 1, "random", 0.1, True),
    "tokens_3d": ((4, 9), 24, 33, 4, 2, 4, "random", 0.3, True),
    "one_branch_no_bias": ((40,), 48, 40, 8, 1, None, "random", 0.1, False),
    "rank64": ((20,), 32, 32, 64, 2, 5, "random", 0.2, True),
    "many_rows": ((75,), 24, 40, 4, 2, 15, "random", 0.1, True),  # dY pass without the N-split
}
FP16_CASES = ("base", "dropout", "tokens_3d", "one_branch_no_bias")


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in CASES] + [(c, torch.float16) for c in FP16_CASES])
def test_forward_backward(case, dtype, device, design):
    shape, k, n, rank, branches, images, alpha, p, bias = CASES[case]
    args = make(shape, k, n, rank, branches, dtype, device, images=images, bias=bias, alpha=alpha)
    check(*args, scale=0.7, p=p, seed=int(torch.randint(0, 2**31 - 1, ())), design=design)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.15])
def test_no_input_grad(device, p, design):
    """x not requiring grad: the dX GEMM is skipped, dA/dB still exact."""
    args = make((21,), 40, 24, 4, 2, torch.float32, device, images=3)
    check(*args, scale=1.3, p=p, seed=11, x_grad=False, design=design)


LAUNCHERS = {"_launch_shrink": "shrink", "_launch_fwd": "fwd", "_launch_bwd_dy": "bwd_dy",
             "_launch_bwd_dx": "bwd_dx", "_launch_bwd_onepass": "bwd_onepass"}


def spy_launches(monkeypatch) -> list[tuple[str, dict]]:
    """Record (tile-table kernel name, tile config) of every launch; the launches still run."""
    log: list[tuple[str, dict]] = []
    for launcher, name in LAUNCHERS.items():
        real = getattr(kernels, launcher)

        def spy(*args, _real=real, _name=name, **kw):
            log.append((_name + ("_onepass" if kw.get("onepass") else ""), args[-1]))
            return _real(*args, **kw)
        monkeypatch.setattr(kernels, launcher, spy)
    return log


@pytest.mark.skipif(not triton_interpreter_ok(), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_design_dispatch(monkeypatch, p):
    """Which kernels each design launches: one-pass forward never runs the shrink; one-pass
    backward (p = 0) never runs the split pair; with dropout backward falls back to split."""
    log = spy_launches(monkeypatch)
    x, w, b, la, lb, al = make((24,), 40, 24, 4, 2, torch.float32, "cpu", images=6)
    x.requires_grad_()
    split_bwd = ["bwd_dy", "bwd_dx"]
    for design, fwd, bwd in (("split", ["shrink", "fwd"], split_bwd),
                             ("onepass", ["fwd_onepass"], ["bwd_onepass"] if p == 0 else split_bwd)):
        log.clear()
        with kernels.use_design(design), petal_fast.use_backend("triton"):
            y = petal_linear(x, w, b, la, lb, al, 1.0, p, 3)
            assert [name for name, _ in log] == fwd, design
            log.clear()
            y.sum().backward()
        assert [name for name, _ in log] == bwd, design


def test_design_selection(monkeypatch):
    from petal_fast import settings
    cpu = torch.device("cpu")
    with settings.override(triton_design=None):  # whatever the shell set: the generation's default
        for direction in kernels.DIRECTIONS:
            assert kernels.design_for(cpu, direction) == kernels.DEFAULT_DESIGN["interpreter"][direction]
        monkeypatch.setitem(kernels.DEFAULT_DESIGN, "interpreter", {"fwd": "onepass", "bwd": "split"})
        assert (kernels.design_for(cpu, "fwd"), kernels.design_for(cpu, "bwd")) == ("onepass", "split")
        with settings.override(triton_design="onepass"):  # PETAL_FAST_TRITON_DESIGN's setting
            assert kernels.design_for(cpu, "bwd") == "onepass"
            with kernels.use_design("split"):  # the context wins over the setting, and nests
                assert kernels.design_for(cpu, "fwd") == "split"
                with kernels.use_design("onepass"):
                    assert kernels.design_for(cpu, "bwd") == "onepass"
                assert kernels.design_for(cpu, "bwd") == "split"
        assert kernels.design_for(cpu, "bwd") == "split"
    with pytest.raises(ValueError, match="triton_design .PETAL_FAST_TRITON_DESIGN."):
        settings.configure(triton_design=" fastest ")
    with pytest.raises(ValueError, match="design must be one of"):
        with kernels.use_design("fastest"):
            pass
    for generation, designs in kernels.DEFAULT_DESIGN.items():
        assert set(designs) == set(kernels.DIRECTIONS) and set(designs.values()) <= set(kernels.DESIGNS)
    assert set(kernels.DEFAULT_DESIGN) == set(kernels.TILE_CONFIGS)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    x, w, b, la, lb, al = make((24,), 40, 24, 4, 2, torch.float32, device, images=6)
    x_t = x.t().contiguous().t()  # same values, column-major strides
    assert not x_t.is_contiguous()
    for design, p in (("split", 0.1), ("onepass", 0.0)):
        check(x_t, w, b, la, lb, al, scale=0.5, p=p, seed=3, design=design)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("branch", [0, 1])
@pytest.mark.parametrize("design", DESIGNS)
def test_dropout_pattern_is_the_reference_mask(branch, device, design):
    """With W = 0 and one branch weighted in, y's zeros are exactly branch ``branch``'s dropped elements."""
    m, k, n, rank, p, seed = 37, 16, 45, 4, 0.4, 2**31 - 5
    x, w, _, la, lb, _ = make((m,), k, n, rank, 2, torch.float32, device)
    alpha = torch.full((m,), float(branch), device=device)  # α = 0 keeps branch 0 only, α = 1 branch 1
    with petal_fast.use_backend("triton"), kernels.use_design(design):
        y = petal_linear(x, torch.zeros_like(w), None, la, lb, alpha, 1.0, p, seed)
    mask = dropout_mask(seed, branch, m, n, p, device=device)
    product = (x @ la[branch].T) @ lb[branch].T
    assert torch.equal(y != 0, mask != 0)
    assert rel_err(y, product * mask) < TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_triton_hash_matches_reference(device):
    from petal_fast.kernels import _rng

    for seed, branch, p, offset in ((0, 0, 0.1, 0), (12345, 1, 0.5, 7), (2**31 - 1, 0, 0.9, 3), (77, 1, 0.0, 0)):
        got = _rng.dropout_mask(seed, branch, 45, 70, p, row_offset=offset, device=device)
        want = dropout_mask(seed, branch, 45, 70, p, row_offset=offset, device=device)
        assert torch.equal(got, want), (seed, branch, p)


@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_inputs_raise(device):
    x, w, b, la, lb, al = make((8,), 16, 16, 4, 2, torch.float32, device, images=2)
    with petal_fast.use_backend("triton"):
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            petal_linear(x.double(), w, b, la, lb, al, 1.0)
        big_a, big_b = torch.randn(2, 65, 16, device=device), torch.randn(2, 16, 65, device=device)
        with pytest.raises(ValueError, match="rank"):
            petal_linear(x, w, b, big_a, big_b, al, 1.0)


# ---------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rank", [8, 16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("design", DESIGNS)
def test_large_shapes_gpu(dtype, rank, p, design):
    args = make((4096,), 1024, 1024, rank, 2, dtype, "cuda", images=64)
    check(*args, scale=0.5, p=p, seed=1234, design=design)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_odd_shapes_gpu(dtype, design, p):
    for shape, k, n, rank, branches in (((1,), 384, 1152, 8, 2), ((64, 49), 96, 288, 4, 2),
                                        ((777,), 1000, 1003, 64, 2), ((200,), 1536, 4608, 8, 1)):
        args = make(shape, k, n, rank, branches, dtype, "cuda", images=shape[0])
        check(*args, scale=0.5, p=p, seed=99, design=design)


def test_tile_table_is_complete():
    """Every GPU generation names legal tiles for every kernel; float32 halves the reduction block."""
    for generation, table in kernels.TILE_CONFIGS.items():
        assert set(kernels.REDUCTION_BLOCK) <= set(table), generation
        assert all(k.removesuffix("_dropout") in kernels.REDUCTION_BLOCK for k in table), generation
        for name, cfg in table.items():
            for key, value in cfg.items():
                if key.startswith("BLOCK_"):
                    assert value >= 16 and value & (value - 1) == 0, (generation, name, key)
    cpu, gpu_like = torch.device("cpu"), kernels.TILE_CONFIGS["default"]
    assert kernels.config_for("fwd", cpu, torch.float32) == kernels.TILE_CONFIGS["interpreter"]["fwd"]
    cuda = torch.device("cuda")
    half = kernels.config_for("fwd", cuda, torch.float32, table=gpu_like)
    assert half["BLOCK_K"] == gpu_like["fwd"]["BLOCK_K"] // 2 and half["BLOCK_M"] == gpu_like["fwd"]["BLOCK_M"] // 2
    assert kernels.config_for("bwd_dy", cuda, torch.bfloat16, table=gpu_like) == gpu_like["bwd_dy"]
    # dropout takes the table's <kernel>_dropout tile where there is one, else the kernel's own
    with_dropout = {**gpu_like, "fwd_dropout": dict(gpu_like["fwd"], BLOCK_N=32)}
    assert kernels.config_for("fwd", cuda, torch.bfloat16, table=with_dropout, dropout=True)["BLOCK_N"] == 32
    assert kernels.config_for("fwd", cuda, torch.bfloat16, table=with_dropout) == gpu_like["fwd"]
    assert kernels.config_for("bwd_dx", cuda, torch.bfloat16, table=with_dropout, dropout=True) == gpu_like["bwd_dx"]


@pytest.mark.skipif(not triton_interpreter_ok(), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("generation", [9, 8, "default"])
@pytest.mark.parametrize("design,p", [("split", 0.2), ("onepass", 0.0)])
def test_gpu_tiles_in_interpreter(generation, design, p):
    """The GPU tables' (large) tiles on shapes smaller and larger than one tile, via the launchers."""
    from petal_fast.ops import _petal_linear_torch as composition

    table = kernels.TILE_CONFIGS[generation]
    m, k, n, branches, rank, images, seed = 150, 40, 136, 2, 4, 10, 5
    x, w, b = torch.randn(m, k), torch.randn(n, k) / k ** 0.5, torch.randn(n)
    a_cat, b_cat = torch.randn(branches * rank, k) / k ** 0.5, torch.randn(n, branches * rank) / rank ** 0.5
    coef, dy = torch.rand(images, branches), torch.randn(m, n)
    with kernels.use_design(design):
        y, u = kernels.forward(x, w, b, a_cat, b_cat, coef, p, seed, table=table)
        grads = kernels.backward(dy, x, w, a_cat, b_cat, coef, u, p, seed, True, table=table)
    d = lambda t: t.double()  # noqa: E731
    y64, u64 = composition.forward(d(x), d(w), d(b), d(a_cat), d(b_cat), d(coef), p, seed)
    grads64 = composition.backward(d(dy), d(x), d(w), d(a_cat), d(b_cat), d(coef), u64, p, seed, True)
    assert rel_err(y, y64) < TOL[torch.float32] and rel_err(u, u64) < TOL[torch.float32]
    for got, want, name in zip(grads, grads64, ("dx", "dA", "dB")):
        assert rel_err(got, want) < TOL[torch.float32], name


@pytest.mark.skipif(not triton_interpreter_ok(), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_tune_picks_fastest_tiles_and_design(p, monkeypatch):
    """The re-tuning search on interpreter tiles with a fake timer: it keeps each kernel's fastest
    candidate and picks, per direction, the design whose kernels add up to less time."""
    small = kernels.TILE_CONFIGS["interpreter"]
    candidates = {name: [cfg, {**cfg, "num_warps": 8}] for name, cfg in small.items()}
    fake_ms = {("shrink", 4): 1.0, ("fwd", 4): 5.0, ("fwd_onepass", 4): 5.5, ("bwd_dy", 4): 2.0,
               ("bwd_dx", 4): 5.0, ("bwd_onepass", 4): 6.0}  # num_warps = 8 is 10% faster throughout
    timed = spy_launches(monkeypatch)

    def bench(fn):
        fn()  # the launch itself must work
        name, cfg = timed[-1]
        return fake_ms[name, 4] * (0.9 if cfg["num_warps"] == 8 else 1.0)

    best, designs = kernels.tune(40, 24, 40, rank=4, dtype=torch.float32, p=p, device="cpu",
                                 candidates=candidates, bench=bench)
    assert all(cfg["num_warps"] == 8 for cfg in best.values())
    assert designs["fwd"] == "onepass"  # 5.5 < 1 + 5
    assert designs["bwd"] == ("split" if p else "onepass")  # one-pass backward: p = 0 only; 6 < 2 + 5
    assert ("bwd_onepass" in best) == (p == 0)


@pytest.mark.slow
@pytest.mark.parametrize("arch,limit", [(90, 227 * 1024), (80, 163 * 1024)])
def test_tile_table_compiles_for_gpu(arch, limit):
    """The table's tiles compile for sm_90 / sm_80 (bf16, p > 0) within the SM's shared memory.

    Compiled ahead of time with Triton's bundled ptxas, so this runs without a GPU; a subprocess
    because the kernels must be real JIT functions (this process may run the interpreter).
    """
    import json
    import os
    import subprocess
    import sys

    code = ("import json; from petal_fast.kernels.petal_linear import compile_check as c; "
            f"print(json.dumps(c({arch}, dropout=True)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert {r["kernel"] for r in rows} == set(kernels.REDUCTION_BLOCK)
    for row in rows:
        assert 0 < row["shared_bytes"] <= limit, row
