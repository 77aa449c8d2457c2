"""Fused Triton kernels for PetalLinear, forward and backward (docs/design.md §1.1).

    y = x Wᵀ + b + s·(1 − α_i)·D₁(x A_lrᵀ B_lrᵀ) + s·α_i·D₂(x A_hrᵀ B_hrᵀ)

With U = x A_catᵀ (M × R, R = branches·r) and the per-row branch weights c = [s(1−α_i), sα_i]
(``coef[row // rows_per_image]``), two designs compute the same numbers (U is rounded to x's
dtype in both, so they agree to the accumulation order):

split (LoRAFusion's choice; 4 launches per step)
    forward   U = x A_catᵀ                                   (_shrink_kernel)
              y = b + x Wᵀ + Σ_k D_k((c_k ⊙ U_k) B_kᵀ)        (_fwd_kernel: one fp32 accumulator)
    backward  dU_k = D_k(dY) B_k,  dT = c ⊙ dU,
              dB_k = D_k(dY)ᵀ (c_k ⊙ U_k)                     (_bwd_dy_kernel: one pass over dY)
              dX = dY W + dT A_cat,  dA = dTᵀ x               (_bwd_dx_kernel: one accumulator)
one-pass (2 launches per step)
    forward   x Wᵀ and U = x A_catᵀ from the same x tiles, then the same epilogue; the first
              N-tile's programs store U for backward       (_fwd_kernel, ONEPASS)
    backward  dY W and dU = dY B_cat from the same dY tiles; dB from the same tiles, each N-tile
              added by one K-tile column of programs; then dX and dA as above (_bwd_onepass_kernel;
              p = 0 with dX wanted — otherwise the split kernels run)

In both, y is stored once and no M×N intermediate exists; with p > 0 each branch's product is
computed by its own small dot and masked before it is added (the masks differ per branch); with
p = 0 both branches are one dot and no hash is evaluated.

Trade-off, written down before any GPU measurement (bf16, R = 16, 128-wide tiles): the split
design pays one extra read of x (shrink) and of dY (dY pass) plus two launches; the one-pass
design recomputes U in every N-tile and dU in every K-tile, RP/BLOCK_N and RP/BLOCK_K = 12.5%
extra tensor-core work. At 8192×4096×4096 on an H100 (~700 TFLOP/s achieved, 3.35 TB/s) the base
GEMM takes ~0.39 ms and the extra reads ~0.02 ms each, so split is expected at ~1.06× the base per
direction and one-pass at ~1.13×; at the PETALface per-GPU batch-8 shapes (M = 200..3200) the
base GEMM takes a few µs and the split design's extra launches (~3–5 µs each) should dominate,
where one-pass is expected to win. ``use_design`` / ``PETAL_FAST_TRITON_DESIGN`` force either;
``DEFAULT_DESIGN`` holds the per-generation choice, ``--tune`` measures both, and the benchmark
(``benchmarks/bench_petal_linear.py``) reports both as ``fused`` and ``fused_onepass``.

Backward reductions over M (dB, dA) are fp32 atomics into zeroed buffers; dT is reduced over
N-splits with atomics only when the dY pass is split over N for occupancy. Atomics make dA/dB
bit-nondeterministic run to run (fp32 summation order), not inexact.

Ranks: R = branches·r ≤ 128 is padded to RP (a power of two ≥ 16, what ``tl.dot`` needs); the
padded columns are masked on load. Any M, K, N (masked edges); float32 (IEEE dot unless torch
allows TF32 matmuls), float16 and bfloat16 with fp32 accumulation.

Tiles come from the static table ``TILE_CONFIGS`` keyed by the GPU's compute-capability major
(no autotune stall at the first call). Re-tune on the current GPU with::

    python -m petal_fast.kernels.petal_linear --tune [--m 8192 --k 4096 --n 4096 --rank 8 --dtype bfloat16]

which times candidate tiles per kernel with ``triton.testing.do_bench``, then each design's kernels
together per direction, and prints the entries to paste into ``TILE_CONFIGS`` and ``DEFAULT_DESIGN``. Without a GPU, ``--compile-check 90`` compiles the table's kernels
for sm_90 (TRITON_DUMP_PTXAS_LOG=1 shows registers and spills) to catch resource overruns.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
from typing import Iterator

import torch
import triton
import triton.language as tl

from ._host import cdiv
from ._rng import host_key, host_threshold, keep_mask

# ------------------------------------------------------------------------------------- tile table
# Block sizes are for 16-bit inputs. float32 halves the reduction block (REDUCTION_BLOCK), so the
# pipelined shared-memory footprint stays the same, and the BLOCK_M of the big GEMMs (IEEE
# fp32 dots hold more in registers). "programs_per_sm" sets the target grid of the dY pass (it
# splits N over programs when M alone gives too few), as a multiple of the SM count.
#
# Checked without a GPU by compiling (no launch) with Triton 3.9 + ptxas -v, using a launch's
# specialisation (unit inner strides, 16-divisible pointers/sizes), rank 8 per branch (RP = 16):
#   sm_90a bf16: shrink 60 KB smem / 48 regs; fwd 128 KB / 112 regs (p = 0), 255 regs (p > 0);
#                bwd_dy 56 KB / 206 regs (p > 0, 8 warps); bwd_dx 128 KB / 206 regs — all
#                software-pipelined, no spills. fp32 with the halving: fwd (p > 0) 72 KB, no
#                spills; bwd_dx 72 KB, 76 B spilled. RP = 128 (rank 64 × 2) at p > 0 spills
#                ~150 B (fwd) and ~750 B (bwd_dy).
#   sm_80 bf16: fwd 48 KB, no spills with 8 warps (4 warps spilled 1.7 KB at p > 0); bwd_dx 80 B.
#   one-pass, sm_90a bf16: fwd_onepass 136 KB / 124 regs (p = 0), 255 regs + 4 B spilled (p > 0);
#                bwd_onepass 104 KB / 164 regs (3 stages). fp32: bwd_onepass spills 84 B (sm_90a),
#                60 B (sm_80). sm_80 bf16: fwd_onepass 34 KB / 249 regs, bwd_onepass 40 KB / 255 regs.
# The Hopper entry is timed (see it); Ampere and the default entry have never run: re-tune there.
TILE_CONFIGS: dict[object, dict[str, dict[str, int]]] = {
    # Hopper: H100 / H200 (228 KB shared memory per SM). p = 0 tiles: the fastest of QUICK_CANDIDATES
    # on an H200 (Triton 3.6, bf16, 8192×4096→4096, r = 8 × 2 branches, p = 0): shrink 27 µs, fwd
    # 483 µs, bwd_dx 496 µs, fwd_onepass 508 µs, bwd_onepass 663 µs (cuBLAS x Wᵀ: 353 µs). With
    # dropout the 128×256 forward tiles ran 4-7× slower in the benchmark (the mask hashing spills):
    # the 128×128 tiles stay for p > 0. bwd_dy keeps its first tile: the search's pick (128×128, one
    # program per SM, 38 µs alone) came with a 0.37 ms slower backward in the benchmark, not yet explained.
    9: {
        "shrink": dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=4),
        "fwd": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        "fwd_dropout": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        "bwd_dy": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3, programs_per_sm=2),
        "bwd_dx": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
        "fwd_onepass": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
        "fwd_onepass_dropout": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        "bwd_onepass": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=256, GROUP_M=8, num_warps=8, num_stages=3),
    },
    8: {  # Ampere / Ada: A100 (164 KB), RTX 30xx/40xx (100 KB) — sized for the smaller
        "shrink": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
        "fwd": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
        "bwd_dy": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, programs_per_sm=2),
        "bwd_dx": dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4),
        "fwd_onepass": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
        "bwd_onepass": dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
    },
    "default": {  # other CUDA GPUs: conservative
        "shrink": dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=2),
        "fwd": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
        "bwd_dy": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, programs_per_sm=2),
        "bwd_dx": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=2),
        "fwd_onepass": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2),
        "bwd_onepass": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=2),
    },
    # CPU tensors under TRITON_INTERPRET=1: the smallest legal tiles, so that tiny test shapes
    # cover several tiles, the GROUP_M swizzle, masked edges and the N-split of the dY pass.
    "interpreter": {
        "shrink": dict(BLOCK_M=16, BLOCK_K=16, num_warps=4, num_stages=1),
        "fwd": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1),
        "bwd_dy": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, programs_per_sm=2),
        "bwd_dx": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1),
        "fwd_onepass": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1),
        "bwd_onepass": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1),
    },
}
REDUCTION_BLOCK = {"shrink": "BLOCK_K", "fwd": "BLOCK_K", "bwd_dy": "BLOCK_N", "bwd_dx": "BLOCK_N",
                   "fwd_onepass": "BLOCK_K", "bwd_onepass": "BLOCK_N"}
BIG_GEMMS = ("fwd", "bwd_dx", "fwd_onepass", "bwd_onepass")  # fp32 also halves their BLOCK_M
INTERPRETER_SMS = 2  # stands in for the SM count on CPU tensors
MAX_R = 128          # branches·rank: two branches of rank 64
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------- design
DESIGNS = ("split", "onepass")
DIRECTIONS = ("fwd", "bwd")
# The design each generation uses by default, per direction (``--tune`` times both and prints the
# winners). Hopper, measured on an H200: forward one-pass 508 µs vs split 510 µs at the goal shape
# (a tie) and one launch fewer, which wins at the batch-8 shapes where launches dominate; backward
# split 533 µs vs one-pass 663 µs. Others: split until measured.
DEFAULT_DESIGN: dict[object, dict[str, str]] = {
    gen: {"fwd": "split", "bwd": "split"} for gen in (8, "default", "interpreter")}
DEFAULT_DESIGN[9] = {"fwd": "onepass", "bwd": "split"}
_design_override: list[str] = []  # process-wide, not thread-local: backward runs on autograd's threads


@contextlib.contextmanager
def use_design(name: str) -> Iterator[None]:
    """Force the ``"split"`` or ``"onepass"`` kernels inside the block (forward and backward).

    Process-wide (backward may run on another thread); for benchmarks and tests. Outside any
    block the environment variable ``PETAL_FAST_TRITON_DESIGN`` and then ``DEFAULT_DESIGN`` decide.
    """
    if name not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {name!r}")
    _design_override.append(name)
    try:
        yield
    finally:
        _design_override.pop()


def design_for(device: torch.device, direction: str) -> str:
    """The design of ``direction`` ("fwd" | "bwd") on ``device``: use_design, then the env variable,
    then ``DEFAULT_DESIGN``."""
    if _design_override:
        return _design_override[-1]
    env = os.environ.get("PETAL_FAST_TRITON_DESIGN", "").strip()
    if env:
        if env not in DESIGNS:
            raise ValueError(f"PETAL_FAST_TRITON_DESIGN must be one of {DESIGNS}, got {env!r}")
        return env
    return DEFAULT_DESIGN[_generation(device)][direction]


def _generation(device: torch.device) -> object:
    if device.type != "cuda":
        return "interpreter"
    major = torch.cuda.get_device_capability(device)[0]
    return major if major in TILE_CONFIGS else "default"


def config_for(kernel: str, device: torch.device, dtype: torch.dtype,
               table: dict | None = None, dropout: bool = False) -> dict[str, int]:
    """The tile configuration of ``kernel`` on ``device`` for inputs of ``dtype``; with dropout the
    table's ``<kernel>_dropout`` entry where it has one (the mask hashing needs registers that a
    larger p = 0 tile does not leave)."""
    cfg = _entry(table or TILE_CONFIGS[_generation(device)], kernel, dropout)
    return _for_dtype(cfg, kernel, dtype) if device.type == "cuda" else cfg


def _entry(table: dict, kernel: str, dropout: bool) -> dict[str, int]:
    return dict(table.get(f"{kernel}_dropout", table[kernel]) if dropout else table[kernel])


def _for_dtype(cfg: dict[str, int], kernel: str, dtype: torch.dtype) -> dict[str, int]:
    if dtype.itemsize == 4:
        halve = (REDUCTION_BLOCK[kernel], "BLOCK_M") if kernel in BIG_GEMMS else (REDUCTION_BLOCK[kernel],)
        for key in halve:
            cfg[key] = max(16, cfg[key] // 2)
    return cfg


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless torch itself allows TF32 matmuls (same numbers as torch.matmul)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_opts(cfg: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in cfg.items() if k != "programs_per_sm"}


# ------------------------------------------------------------------------------------- kernels
@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """GROUP_M swizzle: consecutive programs share row panels, so A/W tiles are reused from L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _row_coef(coef_ptr, offs_m, offs_r, ok, rank, rows_per_image, BRANCHES: tl.constexpr):
    """(BLOCK_M × RP) branch weights c[row // rows_per_image, col // rank], 0 outside ``ok``."""
    image = offs_m // rows_per_image
    branch = offs_r // rank
    return tl.load(coef_ptr + image[:, None] * BRANCHES + branch[None, :], mask=ok, other=0.0)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, u_ptr, M, K, R,
                   s_xm, s_xk, s_ar, s_ak, s_um,
                   RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   PRECISION: tl.constexpr):
    """U = x A_catᵀ for one block of rows (stored in x's dtype, unscaled)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, RP)
    m_ok, r_ok = offs_m < M, offs_r < R
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * s_xm + offs_k[None, :] * s_xk
    a_ptrs = a_ptr + offs_r[None, :] * s_ar + offs_k[:, None] * s_ak          # A_catᵀ tile (BLOCK_K × RP)
    acc = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * s_xk
        a_ptrs += BLOCK_K * s_ak
    u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * s_um + offs_r[None, :]
    tl.store(u_ptrs, acc.to(u_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _expand_bias_store(acc, v, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, m_ok, n_ok, r_ok, rows,
                       rank, key0, key1, threshold, keep_scale, s_bn, s_br, s_ym,
                       BRANCHES: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                       PRECISION: tl.constexpr):
    """acc += Σ_k D_k(V_k B_kᵀ) (V = c ⊙ U, fp32), + bias, store the y tile: the forward epilogue."""
    bt = tl.load(b_ptr + offs_n[None, :] * s_bn + offs_r[:, None] * s_br,
                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)                  # B_catᵀ tile (RP × BLOCK_N)
    if DROPOUT:
        for br in tl.static_range(BRANCHES):  # separate products: each branch has its own mask
            in_br = (offs_r >= br * rank) & (offs_r < (br + 1) * rank)
            part = tl.dot(tl.where(in_br[None, :], v, 0.0).to(bt.dtype), bt, input_precision=PRECISION)
            if br == 0:
                keep = keep_mask(key0, offs_m, offs_n, threshold)
            else:
                keep = keep_mask(key1, offs_m, offs_n, threshold)
            acc += tl.where(keep, part * keep_scale, 0.0)
    else:
        acc = tl.dot(v.to(bt.dtype), bt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * s_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _fwd_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, u_ptr, b_ptr, coef_ptr, y_ptr,
                M, N, K, R, rank, rows_per_image, key0, key1, threshold, keep_scale,
                s_xm, s_xk, s_wn, s_wk, s_ar, s_ak, s_um, s_bn, s_br, s_ym,
                BRANCHES: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ONEPASS: tl.constexpr,
                RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """One y tile: x Wᵀ, then Σ_k D_k((c_k ⊙ U_k) B_kᵀ) in the same accumulator, then bias.

    Split design: U is read from the shrink kernel's output. One-pass (ONEPASS): U = x A_catᵀ is
    accumulated from the x tiles the base GEMM loads anyway (recomputed by every N-tile: RP/BLOCK_N
    extra tensor-core work), and the programs of the first N-tile store it for backward.
    """
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, RP)
    m_ok, n_ok, r_ok = offs_m < M, offs_n < N, offs_r < R
    rows = offs_m.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * s_xm + offs_k[None, :] * s_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * s_wn + offs_k[:, None] * s_wk  # Wᵀ tile (BLOCK_K × BLOCK_N)
    a_ptrs = a_ptr + offs_r[None, :] * s_ar + offs_k[:, None] * s_ak            # A_catᵀ tile (BLOCK_K × RP)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        if ONEPASS:
            at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            u = tl.dot(xt, at, u, input_precision=PRECISION)
            a_ptrs += BLOCK_K * s_ak
        x_ptrs += BLOCK_K * s_xk
        w_ptrs += BLOCK_K * s_wk

    # LoRA expand: V = c ⊙ U (per row, per branch), then V B_catᵀ into the same accumulator
    ur_ok = m_ok[:, None] & r_ok[None, :]
    u_ptrs = u_ptr + rows[:, None] * s_um + offs_r[None, :]
    if ONEPASS:
        if pid_n == 0:
            tl.store(u_ptrs, u.to(u_ptr.dtype.element_ty), mask=ur_ok)
        u = u.to(u_ptr.dtype.element_ty).to(tl.float32)  # the stored rounding: both designs give the same y
    else:
        u = tl.load(u_ptrs, mask=ur_ok, other=0.0).to(tl.float32)
    c = _row_coef(coef_ptr, offs_m, offs_r, ur_ok, rank, rows_per_image, BRANCHES)
    _expand_bias_store(acc, u * c, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, m_ok, n_ok, r_ok, rows,
                       rank, key0, key1, threshold, keep_scale, s_bn, s_br, s_ym,
                       BRANCHES, HAS_BIAS, DROPOUT, PRECISION)


@triton.jit
def _bwd_dy_kernel(dy_ptr, b_ptr, u_ptr, coef_ptr, dt_ptr, db_ptr,
                   M, N, R, rank, rows_per_image, key0, key1, threshold, keep_scale, tiles_per_split,
                   s_dym, s_dyn, s_bn, s_br, s_um,
                   BRANCHES: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DT: tl.constexpr, RP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One pass over a (BLOCK_M rows × a range of N) slab of dY: dT = c ⊙ D(dY) B_cat, dB += D(dY)ᵀ V.

    dT (M × RP, fp32) is stored, or atomically added when N is split over programs; dB (N × R,
    fp32) is always atomically added (it is a reduction over M).
    """
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RP)
    m_ok, r_ok = offs_m < M, offs_r < R
    rows = offs_m.to(tl.int64)
    ur_ok = m_ok[:, None] & r_ok[None, :]
    u = tl.load(u_ptr + rows[:, None] * s_um + offs_r[None, :], mask=ur_ok, other=0.0)
    c = _row_coef(coef_ptr, offs_m, offs_r, ur_ok, rank, rows_per_image, BRANCHES)
    v = (u.to(tl.float32) * c).to(dy_ptr.dtype.element_ty)

    du = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    first = tl.program_id(1) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for t in range(first, last):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + rows[:, None] * s_dym + offs_n[None, :] * s_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * s_bn + offs_r[None, :] * s_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)                # B_cat tile (BLOCK_N × RP)
        if DROPOUT:
            db = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
            for br in tl.static_range(BRANCHES):
                in_br = (offs_r >= br * rank) & (offs_r < (br + 1) * rank)
                if br == 0:
                    keep = keep_mask(key0, offs_m, offs_n, threshold)
                else:
                    keep = keep_mask(key1, offs_m, offs_n, threshold)
                dyk = tl.where(keep, dy.to(tl.float32) * keep_scale, 0.0).to(dy.dtype)
                du = tl.dot(dyk, tl.where(in_br[None, :], b, tl.zeros_like(b)), du, input_precision=PRECISION)
                db = tl.dot(tl.trans(dyk), tl.where(in_br[None, :], v, tl.zeros_like(v)), db,
                            input_precision=PRECISION)
        else:
            du = tl.dot(dy, b, du, input_precision=PRECISION)
            db = tl.dot(tl.trans(dy), v, input_precision=PRECISION)
        tl.atomic_add(db_ptr + offs_n[:, None] * R + offs_r[None, :], db, mask=n_ok[:, None] & r_ok[None, :],
                      sem="relaxed")

    dt = du * c  # dT = c ⊙ dU: linear, so N-split partials can be scaled before they are summed
    dt_ptrs = dt_ptr + rows[:, None] * RP + offs_r[None, :]
    if ATOMIC_DT:
        tl.atomic_add(dt_ptrs, dt, mask=ur_ok, sem="relaxed")
    else:
        tl.store(dt_ptrs, dt, mask=ur_ok)


@triton.jit
def _dx_da_store(acc, dt, a_ptr, x_ptr, dx_ptr, da_ptr, rows, offs_k, offs_r, m_ok, k_ok, r_ok, K,
                 s_ar, s_ak, s_xm, s_xk, s_dxm, COMPUTE_DX: tl.constexpr, PRECISION: tl.constexpr):
    """Backward epilogue of a (BLOCK_M × BLOCK_K) tile: dX = acc + dT A_cat stored (acc = dY W),
    and this tile's share dTᵀ x atomically added to dA."""
    if COMPUTE_DX:
        a = tl.load(a_ptr + offs_r[:, None] * s_ar + offs_k[None, :] * s_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)              # A_cat tile (RP × BLOCK_K)
        acc = tl.dot(dt, a, acc, input_precision=PRECISION)
        tl.store(dx_ptr + rows[:, None] * s_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & k_ok[None, :])
    xt = tl.load(x_ptr + rows[:, None] * s_xm + offs_k[None, :] * s_xk, mask=m_ok[:, None] & k_ok[None, :],
                 other=0.0)
    da = tl.dot(tl.trans(dt), xt, input_precision=PRECISION)
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da, mask=r_ok[:, None] & k_ok[None, :],
                  sem="relaxed")


@triton.jit
def _bwd_dx_kernel(dy_ptr, w_ptr, dt_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
                   M, N, K, R,
                   s_dym, s_dyn, s_wn, s_wk, s_ar, s_ak, s_xm, s_xk, s_dxm,
                   COMPUTE_DX: tl.constexpr, RP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   PRECISION: tl.constexpr):
    """One (BLOCK_M × BLOCK_K) tile of dX = dY W + dT A_cat (one accumulator) and its dA += dTᵀ x part."""
    pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RP)
    m_ok, k_ok, r_ok = offs_m < M, offs_k < K, offs_r < R
    rows = offs_m.to(tl.int64)
    dt = tl.load(dt_ptr + rows[:, None] * RP + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    dt = dt.to(x_ptr.dtype.element_ty)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if COMPUTE_DX:
        dy_ptrs = dy_ptr + rows[:, None] * s_dym + offs_n[None, :] * s_dyn
        w_ptrs = w_ptr + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk        # W tile (BLOCK_N × BLOCK_K)
        for n0 in range(0, N, BLOCK_N):
            n_ok = offs_n < N - n0
            dyt = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)
            dy_ptrs += BLOCK_N * s_dyn
            w_ptrs += BLOCK_N * s_wn
    _dx_da_store(acc, dt, a_ptr, x_ptr, dx_ptr, da_ptr, rows, offs_k, offs_r, m_ok, k_ok, r_ok, K,
                 s_ar, s_ak, s_xm, s_xk, s_dxm, COMPUTE_DX, PRECISION)


@triton.jit
def _bwd_onepass_kernel(dy_ptr, w_ptr, b_ptr, u_ptr, coef_ptr, a_ptr, x_ptr, dx_ptr, da_ptr, db_ptr,
                        M, N, K, R, rank, rows_per_image,
                        s_dym, s_dyn, s_wn, s_wk, s_bn, s_br, s_um, s_ar, s_ak, s_xm, s_xk, s_dxm,
                        BRANCHES: tl.constexpr, RP: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """One-pass design (p = 0), one (BLOCK_M × BLOCK_K) tile of dX and its shares of dA and dB.

    The loop over N that computes dY W also computes dU = dY B_cat from the same dY tiles (each
    K-tile recomputes it: RP/BLOCK_K extra tensor-core work instead of the split design's extra
    pass over dY); dB += dYᵀ V for N-tile t is added by the programs with t ≡ pid_k (mod #K-tiles),
    so every (M-tile, N-tile) pair is counted once (every program computes the product, see the
    loop: another RP/BLOCK_K of tensor-core work).
    Then dT = c ⊙ dU, dX = dY W + dT A_cat (one accumulator), dA += dTᵀ x.
    """
    pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RP)
    m_ok, k_ok, r_ok = offs_m < M, offs_k < K, offs_r < R
    rows = offs_m.to(tl.int64)
    ur_ok = m_ok[:, None] & r_ok[None, :]
    u = tl.load(u_ptr + rows[:, None] * s_um + offs_r[None, :], mask=ur_ok, other=0.0)
    c = _row_coef(coef_ptr, offs_m, offs_r, ur_ok, rank, rows_per_image, BRANCHES)
    v = (u.to(tl.float32) * c).to(dy_ptr.dtype.element_ty)

    dy_ptrs = dy_ptr + rows[:, None] * s_dym + offs_n[None, :] * s_dyn
    w_ptrs = w_ptr + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk            # W tile (BLOCK_N × BLOCK_K)
    b_ptrs = b_ptr + offs_n[:, None] * s_bn + offs_r[None, :] * s_br            # B_cat tile (BLOCK_N × RP)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    du = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for t in range(0, tl.cdiv(N, BLOCK_N)):
        n_ok = offs_n < N - t * BLOCK_N
        dyt = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)
        du = tl.dot(dyt, bt, du, input_precision=PRECISION)
        # No `if` around this: Triton's software pipeliner (3.6 seen on an H200) races a pipelined
        # load used under a condition with the next stage's copy and added zeros or stale tiles to
        # dB. The dot runs in every iteration; only the owning program's atomic is unmasked.
        db = tl.dot(tl.trans(dyt), v, input_precision=PRECISION)
        n_own = offs_n < tl.where(t % k_tiles == pid_k, N - t * BLOCK_N, 0)  # n_ok, or none
        tl.atomic_add(db_ptr + (t * BLOCK_N + offs_n)[:, None] * R + offs_r[None, :], db,
                      mask=n_own[:, None] & r_ok[None, :], sem="relaxed")
        dy_ptrs += BLOCK_N * s_dyn
        w_ptrs += BLOCK_N * s_wn
        b_ptrs += BLOCK_N * s_bn

    dt = (du * c).to(x_ptr.dtype.element_ty)
    _dx_da_store(acc, dt, a_ptr, x_ptr, dx_ptr, da_ptr, rows, offs_k, offs_r, m_ok, k_ok, r_ok, K,
                 s_ar, s_ak, s_xm, s_xk, s_dxm, True, PRECISION)


# ------------------------------------------------------------------------------------- launchers
def _check(x: torch.Tensor, a_cat: torch.Tensor, coef: torch.Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"petal_linear (triton): x must be float32, float16 or bfloat16, got {x.dtype}")
    if a_cat.shape[0] > MAX_R:
        raise ValueError(f"petal_linear (triton): branches·rank must be ≤ {MAX_R} (rank ≤ 64 per branch), "
                         f"got {a_cat.shape[0]}")
    if a_cat.shape[0] % coef.shape[1] or x.shape[0] % coef.shape[0]:
        raise ValueError("petal_linear (triton): coef must be (images, branches) dividing rows and A_cat rows")


def _padded_rank(r_total: int) -> int:
    return max(16, 1 << (r_total - 1).bit_length())


def _common(x, a_cat, coef, p, seed):
    branches = coef.shape[1]
    dropout = p > 0.0
    keys = (host_key(seed, 0), host_key(seed, 1) if branches == 2 else 0) if dropout else (0, 0)
    return dict(branches=branches, rank=a_cat.shape[0] // branches, rows_per_image=x.shape[0] // coef.shape[0],
                dropout=dropout, keys=keys, threshold=host_threshold(p) if dropout else 0,
                keep_scale=1.0 / (1.0 - p), coef=coef.to(torch.float32).contiguous(),
                rp=_padded_rank(a_cat.shape[0]), precision=_precision(x.dtype))


def _launch_shrink(x, a_cat, u, info, cfg) -> None:
    M, K = x.shape
    grid = (cdiv(M, cfg["BLOCK_M"]),)
    _shrink_kernel[grid](x, a_cat, u, M, K, a_cat.shape[0], x.stride(0), x.stride(1), a_cat.stride(0),
                         a_cat.stride(1), u.stride(0), RP=info["rp"], PRECISION=info["precision"],
                         **_launch_opts(cfg))


def _launch_fwd(x, weight, bias, a_cat, u, b_cat, y, info, cfg, onepass: bool) -> None:
    M, K = x.shape
    N = weight.shape[0]
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    _fwd_kernel[grid](x, weight, bias if bias is not None else weight, a_cat, u, b_cat, info["coef"], y,
                      M, N, K, u.shape[1], info["rank"], info["rows_per_image"], *info["keys"],
                      info["threshold"], info["keep_scale"],
                      x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), a_cat.stride(0),
                      a_cat.stride(1), u.stride(0), b_cat.stride(0), b_cat.stride(1), y.stride(0),
                      BRANCHES=info["branches"], HAS_BIAS=bias is not None, DROPOUT=info["dropout"],
                      ONEPASS=onepass, RP=info["rp"], PRECISION=info["precision"], **_launch_opts(cfg))


def _launch_bwd_onepass(dy, weight, b_cat, u, a_cat, x, dx, da, db, info, cfg) -> None:
    M, K = x.shape
    N = weight.shape[0]
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(K, cfg["BLOCK_K"]),)
    _bwd_onepass_kernel[grid](dy, weight, b_cat, u, info["coef"], a_cat, x, dx, da, db, M, N, K, a_cat.shape[0],
                              info["rank"], info["rows_per_image"],
                              dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), b_cat.stride(0),
                              b_cat.stride(1), u.stride(0), a_cat.stride(0), a_cat.stride(1), x.stride(0),
                              x.stride(1), dx.stride(0),
                              BRANCHES=info["branches"], RP=info["rp"], PRECISION=info["precision"],
                              **_launch_opts(cfg))


def _launch_bwd_dy(dy, b_cat, u, dt, db, info, cfg) -> None:
    M, N = dy.shape
    m_tiles, n_tiles = cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"])
    target = cfg["programs_per_sm"] * _sm_count(dy.device)
    split = max(1, min(n_tiles, cdiv(target, m_tiles)))
    tiles_per_split = cdiv(n_tiles, split)
    split = cdiv(n_tiles, tiles_per_split)
    if split > 1:
        dt.zero_()
    _bwd_dy_kernel[(m_tiles, split)](dy, b_cat, u, info["coef"], dt, db, M, N, u.shape[1], info["rank"],
                                     info["rows_per_image"], *info["keys"], info["threshold"],
                                     info["keep_scale"], tiles_per_split,
                                     dy.stride(0), dy.stride(1), b_cat.stride(0), b_cat.stride(1), u.stride(0),
                                     BRANCHES=info["branches"], DROPOUT=info["dropout"], ATOMIC_DT=split > 1,
                                     RP=info["rp"], PRECISION=info["precision"], **_launch_opts(cfg))


def _launch_bwd_dx(dy, weight, dt, a_cat, x, dx, da, info, cfg) -> None:
    M, K = x.shape
    N = weight.shape[0]
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(K, cfg["BLOCK_K"]),)
    out = dx if dx is not None else x  # unused pointer when dX is not wanted
    _bwd_dx_kernel[grid](dy, weight, dt, a_cat, x, out, da, M, N, K, a_cat.shape[0],
                         dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), a_cat.stride(0),
                         a_cat.stride(1), x.stride(0), x.stride(1), out.stride(0),
                         COMPUTE_DX=dx is not None, RP=info["rp"], PRECISION=info["precision"],
                         **_launch_opts(cfg))


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_cat: torch.Tensor,
            b_cat: torch.Tensor, coef: torch.Tensor, p: float, seed: int,
            table: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, U): y = b + x Wᵀ + Σ_k D_k((c_k ⊙ U_k) B_kᵀ), U = x A_catᵀ (M × R, x's dtype, unscaled)."""
    _check(x, a_cat, coef)
    M, N = x.shape[0], weight.shape[0]
    info = _common(x, a_cat, coef, p, seed)
    u = torch.empty((M, a_cat.shape[0]), dtype=x.dtype, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, u
    if N and design_for(x.device, "fwd") == "onepass":
        cfg = config_for("fwd_onepass", x.device, x.dtype, table, info["dropout"])
        _launch_fwd(x, weight, bias, a_cat, u, b_cat, y, info, cfg, onepass=True)
        return y, u
    _launch_shrink(x, a_cat, u, info, config_for("shrink", x.device, x.dtype, table))
    if N:
        cfg = config_for("fwd", x.device, x.dtype, table, info["dropout"])
        _launch_fwd(x, weight, bias, a_cat, u, b_cat, y, info, cfg, onepass=False)
    return y, u


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor,
             coef: torch.Tensor, u: torch.Tensor, p: float, seed: int, need_x: bool,
             table: dict | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dX or None, dA_cat (R × K), dB_cat (N × R)) in x's dtype; W, b frozen.

    The one-pass design covers p = 0 with dX wanted; with dropout (masks would be hashed in the
    main loop, once per K-tile) or without dX (no dY W loop to share) the split kernels run.
    """
    _check(x, a_cat, coef)
    M, K = x.shape
    N, R = weight.shape[0], a_cat.shape[0]
    info = _common(x, a_cat, coef, p, seed)
    # dB and dA accumulate in fp32 (atomics): one zeroed buffer and one cast for both, not two each
    grads = torch.zeros(N * R + R * K, dtype=torch.float32, device=x.device)
    db, da = grads[:N * R].view(N, R), grads[N * R:].view(R, K)
    dx = torch.empty_like(x) if need_x else None
    if M and N and K and need_x and not info["dropout"] and design_for(x.device, "bwd") == "onepass":
        _launch_bwd_onepass(dy, weight, b_cat, u, a_cat, x, dx, da, db, info,
                            config_for("bwd_onepass", x.device, x.dtype, table))
        return (dx, *_split_grads(grads.to(x.dtype), N, R, K))
    # dT = c ⊙ dU (fp32, padded to RP): the dY pass writes every row (zeroing first when it splits N)
    dt = (torch.empty if N else torch.zeros)((M, info["rp"]), dtype=torch.float32, device=x.device)
    if M and N:
        _launch_bwd_dy(dy, b_cat, u, dt, db, info, config_for("bwd_dy", x.device, x.dtype, table))
    if M and K:
        _launch_bwd_dx(dy, weight, dt, a_cat, x, dx, da, info, config_for("bwd_dx", x.device, x.dtype, table))
    elif dx is not None:
        dx.zero_()
    return (dx, *_split_grads(grads.to(x.dtype), N, R, K))


def _split_grads(grads: torch.Tensor, N: int, R: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA_cat (R × K), dB_cat (N × R)) views of the one gradient buffer [dB | dA]."""
    return grads[N * R:].view(R, K), grads[:N * R].view(N, R)


# ------------------------------------------------------------------------------------- re-tuning
CANDIDATES = {
    "shrink": [dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=s)
               for bm in (32, 64, 128) for bk in (64, 128) for w in (4, 8) for s in (2, 3, 4)],
    "fwd": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
            for bm, bn in ((128, 128), (128, 256), (64, 128), (128, 64)) for bk in (32, 64)
            for w in (4, 8) for s in (3, 4)],
    "bwd_dy": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, programs_per_sm=ps)
               for bm in (32, 64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3) for ps in (1, 2, 4)],
    "bwd_dx": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
               for bm, bk in ((128, 128), (128, 256), (64, 128), (128, 64)) for bn in (32, 64)
               for w in (4, 8) for s in (3, 4)],
}
CANDIDATES["fwd_onepass"] = CANDIDATES["fwd"]
CANDIDATES["bwd_onepass"] = CANDIDATES["bwd_dx"]
# A pruned search (~8 tiles a kernel, around the table's entry) that fits a short GPU lease:
# each candidate costs a compile (~1-2 s) more than its timing.
QUICK_CANDIDATES = {
    "shrink": [dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=s)
               for bm, bk, w, s in ((64, 128, 4, 3), (32, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4),
                                    (64, 128, 4, 4), (128, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 4))],
    "fwd": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                                     (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                                     (128, 128, 64, 8, 3), (128, 256, 32, 8, 4))],
    "bwd_dy": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, programs_per_sm=ps)
               for bm, bn, w, s, ps in ((64, 128, 8, 3, 2), (64, 128, 4, 3, 2), (128, 128, 8, 3, 1),
                                        (32, 128, 4, 3, 4), (64, 64, 4, 2, 2), (128, 64, 8, 2, 2),
                                        (64, 128, 8, 2, 4), (128, 128, 8, 2, 2))],
    "bwd_dx": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in ((128, 64, 128, 8, 4), (128, 64, 128, 8, 3), (128, 32, 128, 8, 4),
                                        (128, 64, 256, 8, 3), (64, 64, 128, 4, 4), (128, 64, 64, 4, 4),
                                        (128, 32, 256, 8, 3), (128, 64, 128, 4, 3))],
}
QUICK_CANDIDATES["fwd_onepass"] = QUICK_CANDIDATES["fwd"]
QUICK_CANDIDATES["bwd_onepass"] = QUICK_CANDIDATES["bwd_dx"]
# the kernels each design launches per direction (their best times add up)
DESIGN_KERNELS = {("split", "fwd"): ("shrink", "fwd"), ("onepass", "fwd"): ("fwd_onepass",),
                  ("split", "bwd"): ("bwd_dy", "bwd_dx"), ("onepass", "bwd"): ("bwd_onepass",)}


def tune(m: int = 8192, k: int = 4096, n: int = 4096, rank: int = 8, branches: int = 2,
         dtype: torch.dtype = torch.bfloat16, p: float = 0.0, device: str = "cuda",
         candidates: dict[str, list[dict[str, int]]] | None = None,
         bench=None) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """Time every candidate tile of each kernel on the current GPU; return the fastest per kernel
    and, per direction, the faster design (the sum of its kernels' best times).

    Configurations are given for 16-bit inputs (``config_for`` derives the float32 tiles from
    them); tune with a 16-bit dtype to fill the table. With p > 0 the one-pass backward is not
    used (see ``backward``), so only the split backward is tuned. ``device``, ``candidates`` and
    ``bench`` (a callable timing a function in ms; default ``triton.testing.do_bench``) exist so
    the search itself can be tested in the interpreter.
    """
    from petal_fast.progress import progress

    if bench is None:
        from triton.testing import do_bench as bench
    candidates = candidates or CANDIDATES
    dev = torch.device(device)
    x = torch.randn(m, k, device=dev, dtype=dtype)
    w = torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5
    bias = torch.randn(n, device=dev, dtype=dtype)
    a_cat = torch.randn(branches * rank, k, device=dev, dtype=dtype) / k ** 0.5
    b_cat = torch.randn(n, branches * rank, device=dev, dtype=dtype)
    coef = torch.rand(8, branches, device=dev)
    info = _common(x, a_cat, coef, p, 0)
    u = torch.empty(m, branches * rank, device=dev, dtype=dtype)
    y, dy, dx = torch.empty(m, n, device=dev, dtype=dtype), torch.randn(m, n, device=dev, dtype=dtype), torch.empty_like(x)
    dt = torch.zeros(m, info["rp"], device=dev)
    db, da = torch.zeros(n, branches * rank, device=dev), torch.zeros(branches * rank, k, device=dev)
    runs = {
        "shrink": lambda cfg: _launch_shrink(x, a_cat, u, info, cfg),
        "fwd": lambda cfg: _launch_fwd(x, w, bias, a_cat, u, b_cat, y, info, cfg, onepass=False),
        "bwd_dy": lambda cfg: _launch_bwd_dy(dy, b_cat, u, dt, db, info, cfg),
        "bwd_dx": lambda cfg: _launch_bwd_dx(dy, w, dt, a_cat, x, dx, da, info, cfg),
        "fwd_onepass": lambda cfg: _launch_fwd(x, w, bias, a_cat, u, b_cat, y, info, cfg, onepass=True),
        "bwd_onepass": lambda cfg: _launch_bwd_onepass(dy, w, b_cat, u, a_cat, x, dx, da, db, info, cfg),
    }
    if info["dropout"]:
        del runs["bwd_onepass"]
    best: dict[str, dict[str, int]] = {}
    best_ms: dict[str, float] = {}
    for name, run in runs.items():
        timings = []
        for cfg in progress(candidates[name], desc=f"tune {name}"):
            try:
                timings.append((bench(lambda: run(cfg)), cfg))
            except triton.runtime.errors.OutOfResources:
                continue  # too much shared memory / registers for this GPU
            except Exception as err:  # noqa: BLE001 - a tile that fails to compile is no candidate
                print(f"{name} {cfg}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        if not timings:
            print(f"{name}: no candidate ran")
            continue
        best_ms[name], best[name] = min(timings, key=lambda t: t[0])
        print(f"{name:11s} {best_ms[name] * 1e3:9.1f} us  {best[name]}")
    designs: dict[str, str] = {}
    for direction in DIRECTIONS:
        totals = {d: sum(best_ms[kn] for kn in DESIGN_KERNELS[d, direction]) for d in DESIGNS
                  if all(kn in best_ms for kn in DESIGN_KERNELS[d, direction])}
        designs[direction] = min(totals, key=totals.get)
        print(f"{direction}: " + ", ".join(f"{d} {t * 1e3:.1f} us" for d, t in totals.items())
              + f" -> {designs[direction]}")
    return best, designs


def compile_check(arch: int = 90, dtype: torch.dtype = torch.bfloat16, rank: int = 8, branches: int = 2,
                  dropout: bool = False) -> list[dict[str, object]]:
    """Compile every kernel for ``sm_<arch>`` with its table tiles, without a GPU (no launch).

    Uses the specialisation a real launch gets (unit inner strides, 16-divisible pointers and
    sizes) and returns the shared memory per kernel; with ``TRITON_DUMP_PTXAS_LOG=1`` ptxas also
    prints registers and spills. Run with TRITON_INTERPRET unset.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    d = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    rp, precision = _padded_rank(branches * rank), "ieee" if dtype == torch.float32 else "tf32"
    unit = {"s_xk", "s_wk", "s_ak", "s_br", "s_dyn"}
    div16 = {"M", "N", "K", "s_xm", "s_wn", "s_ar", "s_um", "s_bn", "s_ym", "s_dym", "s_dxm"}
    fp32_ptrs = {"coef_ptr", "dt_ptr", "db_ptr", "da_ptr"}
    fwd = dict(BRANCHES=branches, HAS_BIAS=True, DROPOUT=dropout, RP=rp, PRECISION=precision)
    kernels = {
        "shrink": (_shrink_kernel, dict(RP=rp, PRECISION=precision)),
        "fwd": (_fwd_kernel, {**fwd, "ONEPASS": False}),
        "bwd_dy": (_bwd_dy_kernel, dict(BRANCHES=branches, DROPOUT=dropout, ATOMIC_DT=True, RP=rp,
                                         PRECISION=precision)),
        "bwd_dx": (_bwd_dx_kernel, dict(COMPUTE_DX=True, RP=rp, PRECISION=precision)),
        "fwd_onepass": (_fwd_kernel, {**fwd, "ONEPASS": True}),
        "bwd_onepass": (_bwd_onepass_kernel, dict(BRANCHES=branches, RP=rp, PRECISION=precision)),  # p = 0 only
    }
    table = TILE_CONFIGS.get(arch // 10, TILE_CONFIGS["default"])
    rows = []
    for name, (fn, consts) in kernels.items():
        cfg = _for_dtype(_entry(table, name, dropout), name, dtype)
        opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        cfg.pop("programs_per_sm", None)
        consts = {**consts, **cfg, **{a: 1 for a in unit if a in fn.arg_names}}
        signature, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg in consts:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = "*" + ("fp32" if arg in fp32_ptrs else d)
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[arg] = "fp32" if arg == "keep_scale" else "i32"
                if arg in div16:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        rows.append({"kernel": name, "shared_bytes": compiled.metadata.shared, **opts, **cfg})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Re-tune the PetalLinear Triton tiles on the current GPU.")
    parser.add_argument("--tune", action="store_true", help="time candidate tiles and print a TILE_CONFIGS entry")
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--branches", type=int, default=2, choices=(1, 2))
    parser.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true", help="the pruned QUICK_CANDIDATES search (~1 min on an H100)")
    parser.add_argument("--compile-check", type=int, metavar="ARCH",
                        help="compile the table's kernels for sm_ARCH (e.g. 90) without a GPU and print shared memory")
    args = parser.parse_args()
    if args.compile_check:
        for row in compile_check(args.compile_check, getattr(torch, args.dtype), args.rank, args.branches,
                                 args.dropout > 0):
            print(row)
        return
    if not args.tune:
        parser.print_help()
        return
    if not torch.cuda.is_available():
        raise SystemExit("--tune needs a CUDA GPU")
    best, designs = tune(args.m, args.k, args.n, args.rank, args.branches, getattr(torch, args.dtype), args.dropout,
                          candidates=QUICK_CANDIDATES if args.quick else None)
    major = torch.cuda.get_device_capability()[0]
    print(f"\n# {torch.cuda.get_device_name()} — paste into TILE_CONFIGS:\n{major}: {{")
    for name, cfg in best.items():
        print(f"    {name!r}: dict({', '.join(f'{k}={v}' for k, v in cfg.items())}),")
    print(f"}},\n# and into DEFAULT_DESIGN:\n{major}: {designs!r},")


if __name__ == "__main__":
    main()
