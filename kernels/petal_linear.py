"""Launchers of the fused PetalLinear Triton kernels, forward and backward (docs/design.md §1.1).

    y = x Wᵀ + b + s·(1 − α_i)·D₁(x A_lrᵀ B_lrᵀ) + s·α_i·D₂(x A_hrᵀ B_hrᵀ)

    forward(x, W, b, lora_A, lora_B, α, s, p, seed, stream)            -> (y, U)
    backward(dY, x, W, lora_A, lora_B, α, U, s, p, seed, stream, need_x) -> (dX | None, dA, dB)

x (M × K) and dY (M × N) row-major, W (N × K) and b (N,) frozen, lora_A (branches, r, K) and
lora_B (branches, N, r) the parameters in any strides (A_cat = lora_A as R × K rows, B_cat the
N × R concatenation, R = branches·r, never built), α (images,) for two branches (None for one),
seed a 1-element int64 tensor on x's device (read by the kernels only, and only with p > 0), stream a
layer's int in [0, 2³¹) (seed' = (seed ^ mix(stream)) & 0x7FFFFFFF, kernels/_rng.py). The branch
weights c = [s(1 − α_i), sα_i] (c = s with one branch) are computed in fp32 inside the kernels per row,
i = row // (M / images). U = x A_catᵀ (M × R, x's dtype, unscaled) is returned for backward; dA and dB
come back in the parameters' dtype, contiguous in their canonical layout.

Two designs compute the same numbers (U is rounded to x's dtype in both):

split (LoRAFusion's choice)
    forward   U = x A_catᵀ (shrink), y = b + x Wᵀ + Σ_k D_k((c_k ⊙ U_k) B_kᵀ)        (fwd: one accumulator)
    backward  dU_k = D_k(dY) B_k, dT = c ⊙ dU, dB_k = D_k(dY)ᵀ (c_k ⊙ U_k)            (bwd_dy: one pass over dY)
              dX = dY W + dT A_cat, dA = dTᵀ x                                       (bwd_dx: one accumulator)
one-pass
    forward   x Wᵀ and U from the same x tiles, the first N-tile's programs store U   (fwd_onepass)
    backward  dY W, dU and dB from the same dY tiles, then dX and dA (bwd_onepass; p = 0 with dX
              wanted, otherwise the split kernels run)

Launches per call (the CUDA work; allocations are torch.empty only):
    forward   split: shrink + fwd = 2 Triton launches; one-pass: 1. No other CUDA kernel.
    backward  one memset of one fp32 workspace [dA | dB | dT when the dY pass splits N] + bwd_dy +
              bwd_dx (split) or bwd_onepass + finalize (the cast of dA, dB to the parameters' dtype;
              none for float32 unless dT shares the workspace): ≤ 3 Triton launches + 1 memset.
The reductions over M (dA, dB, dT across N-splits) are fp32 atomics: bit-nondeterministic run to run
(summation order), not inexact.

Host path: everything that depends only on (device, dtype, shapes, p, flags, design, table) — tiles,
grids, the launch's constexpr keywords — is computed once and cached (``_forward_plan`` /
``_backward_plan``); a call builds its argument tuple, allocates, and launches.

On Hopper, 16-bit inputs whose strides TMA can address run the persistent TMA kernels of
``petal_linear_tma`` for the forward GEMM and dX (their descriptors need a global scratch, allocated
through ``triton.set_allocator``); everything else, and the interpreter's default table, runs the
pointer kernels of ``petal_linear_kernels``. Tiles and designs: ``petal_linear_config``; re-tuning and
the ahead-of-time compile check: ``tune_petal_linear``.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import triton
from torch.fx.experimental.symbolic_shapes import optimization_hint

from ._host import direct
from ._rng import host_threshold, stream_mix
from .petal_linear_config import (  # noqa: F401  (re-exported: the public names of the Triton PetalLinear)
    DEFAULT_DESIGN, DESIGN_KERNELS, DESIGNS, DIRECTIONS, KERNELS, MAX_R, REDUCTION_BLOCK, TILE_CONFIGS, TMA_KERNELS,
    choose, design_for, generation, ladder, padded_rank, sm_count, tiles, use_design)
from .petal_linear_kernels import (bwd_dx_kernel, bwd_dy_kernel, bwd_onepass_kernel, finalize_kernel, fwd_kernel,
                                   shrink_kernel)
from .petal_linear_tma import bwd_dx_tma_kernel, fwd_tma_kernel

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FINALIZE_BLOCK = 1024
_HOST_ONLY = ("programs_per_sm", "TMA")  # table keys that are not kernel arguments
_PLAN_CACHE_LIMIT = 4096


class Launch(NamedTuple):
    """One kernel launch of a plan: the JIT function, its grid and its constexpr keywords."""
    kernel: Callable
    grid: tuple[int, ...]
    meta: dict


class ForwardPlan(NamedTuple):
    shrink: Launch | None
    fwd: Launch | None
    rows_per_image: int
    threshold: int
    keep_scale: float


class BackwardPlan(NamedTuple):
    onepass: Launch | None
    dy: Launch | None
    dy_tiles_per_split: int  # N-tiles per program of the dY pass
    dx: Launch | None
    finalize: Launch | None
    ws_numel: int      # fp32 workspace: [dA (R·K) | dB (R·N) | dT (M·RP) when it must start at zero]
    dt_in_ws: bool
    rp: int
    rows_per_image: int
    threshold: int
    keep_scale: float


def _precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless torch itself allows TF32 matmuls (same numbers as torch.matmul)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _meta(cfg: dict[str, int], **consts) -> dict:
    return {**{k: v for k, v in cfg.items() if k not in _HOST_ONLY}, **consts}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch of a launch (the TMA kernels' device-side descriptors), from torch's caching allocator."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """TMA kernels need ``triton.set_allocator``; it is a context variable, so each thread that
    launches (autograd runs backward on its own threads) sets ours unless one is set there."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def _tma_ok(dtype: torch.dtype, device: torch.device, *row_elems: int) -> bool:
    """TMA kernels: 16-bit inputs on a GPU (the interpreter runs any dtype), nonempty, 16-byte row strides."""
    if device.type == "cuda" and dtype.itemsize != 2:
        return False
    return all(n > 0 and n * dtype.itemsize % 16 == 0 for n in row_elems)


def _aligned(*tensors: torch.Tensor) -> bool:
    """Base pointers 16-byte aligned (TMA). A traced graph's tensors hold no pointer: Inductor allocates
    its buffers 16-byte aligned and copies misaligned graph inputs before the call, so they count as aligned."""
    bits = 0
    for t in tensors:
        if type(t) is not torch.Tensor:  # fake / functional tensors of a trace: no storage to ask
            continue
        bits |= t.data_ptr()
    return bits % 16 == 0


def _check(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: torch.Tensor | None) -> None:
    """Validated once per plan (a cached plan was validated when it was made)."""
    if x.dtype not in DTYPES:
        raise TypeError(f"petal_linear (triton): x must be float32, float16 or bfloat16, got {x.dtype}")
    branches, rank = lora_A.shape[0], lora_A.shape[1]
    if branches * rank > MAX_R:
        raise ValueError(f"petal_linear (triton): branches·rank must be ≤ {MAX_R} (rank ≤ 64 per branch), "
                         f"got {branches * rank}")
    if branches not in (1, 2) or (alpha is None) != (branches == 1):
        raise ValueError("petal_linear (triton): alpha must be given for two branches and None for one, "
                         f"got {branches} branches and alpha {'None' if alpha is None else 'given'}")
    if alpha is not None and (alpha.dim() != 1 or alpha.shape[0] == 0 or x.shape[0] % alpha.shape[0]
                              or not alpha.dtype.is_floating_point or not alpha.is_contiguous()):
        raise ValueError(f"petal_linear (triton): alpha must be a contiguous float (images,) tensor dividing the "
                         f"{x.shape[0]} rows, got {tuple(alpha.shape)} {alpha.dtype}")
    if lora_B.shape[0] != branches or lora_B.shape[2] != rank:
        raise ValueError(f"petal_linear (triton): lora_B must be ({branches}, N, {rank}), got {tuple(lora_B.shape)}")


_forward_plans: dict[tuple, ForwardPlan] = {}
_backward_plans: dict[tuple, BackwardPlan] = {}


def _remember(cache: dict, key: tuple, plan) -> None:
    if len(cache) >= _PLAN_CACHE_LIMIT:
        cache.clear()  # dynamic shapes without end: start over rather than grow
    cache[key] = plan


def _rows_hint(M) -> int:
    """M for choosing tiles: its value, or under torch.compile with a dynamic batch the traced example's
    (no guard, so a new batch size does not recompile; every tile is correct for every M)."""
    return M if type(M) is int else optimization_hint(M, fallback=4096)


def _forward_plan(x, weight, bias, lora_A, lora_B, alpha, p: float, table: dict | None,
                  design: str, tma_aligned: bool) -> ForwardPlan:
    """Tiles, grids and launch keywords of a forward call. M may be symbolic (a traced dynamic batch):
    grids are then SymInt expressions."""
    _check(x, lora_A, lora_B, alpha)
    device, dtype = x.device, x.dtype
    (M, K), N = x.shape, weight.shape[0]
    m_hint = _rows_hint(M)
    branches, rank = lora_A.shape[0], lora_A.shape[1]
    rp, precision, dropout, sms = padded_rank(branches * rank), _precision(dtype), p > 0.0, sm_count(device)
    shrink = fwd = None
    onepass = design == "onepass" and N > 0
    if not onepass:
        cfg = tiles(choose("shrink", ladder("shrink", device, table), m_hint, 0, sms), "shrink", dtype)
        shrink = Launch(shrink_kernel, (_cdiv(M, cfg["BLOCK_M"]),), _meta(cfg, RP=rp, PRECISION=precision))
    if N:
        name = "fwd_onepass" if onepass else "fwd"
        rung = choose(name, ladder(name, device, table, dropout), m_hint, N, sms)
        tma = (bool(rung.get("TMA")) and tma_aligned and weight.stride(1) == 1
               and _tma_ok(dtype, device, K, N, weight.stride(0)))
        cfg = tiles(rung, name, dtype, tma)
        consts = dict(BRANCHES=branches, HAS_BIAS=bias is not None, DROPOUT=dropout, ONEPASS=onepass, RP=rp,
                      PRECISION=precision)
        m_tiles, n_tiles = _cdiv(M, cfg["BLOCK_M"]), _cdiv(N, cfg["BLOCK_N"])
        if tma:
            grid = (torch.sym_min(m_tiles * n_tiles, sms * cfg.get("programs_per_sm", 1)),)
            fwd = Launch(fwd_tma_kernel, grid, _meta(cfg, **consts))
        else:
            fwd = Launch(fwd_kernel, (m_tiles * n_tiles,),
                         _meta({k: v for k, v in cfg.items() if k not in ("EPI_SPLIT", "FLATTEN")}, **consts))
    return ForwardPlan(
        shrink, fwd, M // alpha.shape[0] if alpha is not None else M,
        host_threshold(p) if dropout else 0, 1.0 / (1.0 - p))


def _dy_split(m_tiles, n_tiles: int, target: int) -> tuple:
    """(programs over N, N-tiles per program, atomic dT?) for the dY pass: enough programs to fill the
    device. SymInt arithmetic when M is symbolic; dT is then atomic whenever N has more than one tile
    (right for any split, no guard on M)."""
    split = torch.sym_max(1, torch.sym_min(n_tiles, _cdiv(target, m_tiles)))
    per = _cdiv(n_tiles, split)
    split = _cdiv(n_tiles, per)
    return split, per, (split > 1) if type(m_tiles) is int else n_tiles > 1


def _backward_plan(x, weight, lora_A, lora_B, alpha, p: float, need_x: bool, table: dict | None,
                   design: str, tma_aligned: bool) -> BackwardPlan:
    _check(x, lora_A, lora_B, alpha)
    device, dtype = x.device, x.dtype
    (M, K), N = x.shape, weight.shape[0]
    m_hint = _rows_hint(M)
    branches, rank = lora_A.shape[0], lora_A.shape[1]
    R = branches * rank
    rp, precision, dropout, sms = padded_rank(R), _precision(dtype), p > 0.0, sm_count(device)
    onepass = dy = dx = None
    dt_in_ws, per = False, 0
    if design == "onepass" and need_x and not dropout and N and K:
        cfg = tiles(choose("bwd_onepass", ladder("bwd_onepass", device, table), m_hint, K, sms), "bwd_onepass",
                    dtype)
        grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(K, cfg["BLOCK_K"]),)
        onepass = Launch(bwd_onepass_kernel, grid, _meta(cfg, BRANCHES=branches, RP=rp, PRECISION=precision))
    else:
        if N:
            rung = choose("bwd_dy", ladder("bwd_dy", device, table, dropout), m_hint, N, sms)
            cfg = tiles(rung, "bwd_dy", dtype)
            m_tiles = _cdiv(M, cfg["BLOCK_M"])
            split, per, dt_in_ws = _dy_split(m_tiles, _cdiv(N, cfg["BLOCK_N"]), sms * cfg.get("programs_per_sm", 1))
            dy = Launch(bwd_dy_kernel, (m_tiles, split),
                        _meta(cfg, BRANCHES=branches, DROPOUT=dropout, ATOMIC_DT=dt_in_ws, RP=rp,
                              PRECISION=precision))
        else:
            dt_in_ws = True  # no dY pass: dT = 0, the zeroed workspace
        if K:
            rung = choose("bwd_dx", ladder("bwd_dx", device, table, dropout), m_hint, K, sms)
            tma = (need_x and bool(rung.get("TMA")) and tma_aligned and weight.stride(1) == 1
                   and _tma_ok(dtype, device, K, N, weight.stride(0)))
            cfg = tiles(rung, "bwd_dx", dtype, tma)
            count = _cdiv(M, cfg["BLOCK_M"]) * _cdiv(K, cfg["BLOCK_K"])
            if tma:
                dx = Launch(bwd_dx_tma_kernel, (torch.sym_min(count, sms * cfg.get("programs_per_sm", 1)),),
                            _meta({k: v for k, v in cfg.items() if k != "EPI_SPLIT"}, RP=rp, PRECISION=precision))
            else:
                dx = Launch(bwd_dx_kernel, (count,),
                            _meta({k: v for k, v in cfg.items() if k not in ("EPI_SPLIT", "FLATTEN")},
                                  COMPUTE_DX=need_x, RP=rp, PRECISION=precision))
    grads = R * (K + N)
    finalize = None
    if dtype != torch.float32 or dt_in_ws:
        finalize = Launch(finalize_kernel, (_cdiv(grads, FINALIZE_BLOCK),), dict(BLOCK=FINALIZE_BLOCK))
    return BackwardPlan(
        onepass, dy, per, dx, finalize, grads + (M * rp if dt_in_ws else 0), dt_in_ws, rp,
        M // alpha.shape[0] if alpha is not None else M, host_threshold(p) if dropout else 0, 1.0 / (1.0 - p))


@functools.lru_cache(maxsize=4096)
def _stream_mix(stream: int) -> int:
    return stream_mix(stream)


def _static(x: torch.Tensor, alpha: torch.Tensor | None) -> bool:
    """Plain int sizes (not a traced dynamic batch)."""
    return all(type(d) is int for d in x.shape) and (alpha is None or type(alpha.shape[0]) is int)


def _key(x, weight, bias, lora_A, lora_B, alpha, p, design, tma_aligned, *extra) -> tuple:
    """What a plan depends on (and was validated for)."""
    return (x.device, x.dtype, x.shape, weight.shape, weight.stride(), lora_A.shape, lora_B.shape, bias is None,
            None if alpha is None else (alpha.shape, alpha.stride(), alpha.dtype), p, design, tma_aligned,
            x.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32,
            *extra)


def _planned(cache: dict, cacheable: bool, key_parts: tuple, build: Callable[[], object]):
    """A call's plan: from ``cache`` by ``_key(*key_parts)`` when the call is cacheable (static shapes, the
    device's table), else built — and remembered when cacheable. A traced symbolic batch is planned
    once per trace, not cached."""
    key = _key(*key_parts) if cacheable else None
    plan = cache.get(key) if cacheable else None
    if plan is None:
        plan = build()
        if cacheable:
            _remember(cache, key, plan)
    return plan


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
            lora_B: torch.Tensor, alpha: torch.Tensor | None, scale: float, p: float, seed: torch.Tensor | None,
            stream: int, table: dict | None = None, wrap: Callable = direct,
            design: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, U): y = b + x Wᵀ + Σ_k D_k((c_k ⊙ U_k) B_kᵀ), U = x A_catᵀ (M × R, x's dtype, unscaled).

    ``table``: a tile table instead of the device's (tests, the tuner); ``wrap``: applied to each
    kernel before its launch (``torch.library.wrap_triton`` in a triton_op); ``design``: the
    ``triton_design`` setting (None: ``DEFAULT_DESIGN``; a ``use_design`` block wins).
    """
    if not x.is_contiguous():
        raise ValueError("petal_linear (triton): x must be row-major contiguous")
    tma_aligned = _aligned(x, weight)
    design = design_for(x.device, "fwd", design)
    plan = _planned(_forward_plans, table is None and _static(x, alpha),
                    (x, weight, bias, lora_A, lora_B, alpha, p, design, tma_aligned),
                    lambda: _forward_plan(x, weight, bias, lora_A, lora_B, alpha, p, table, design, tma_aligned))
    (M, K), N = x.shape, weight.shape[0]
    rank = lora_A.shape[1]
    R = lora_A.shape[0] * rank
    u = torch.empty((M, R), dtype=x.dtype, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    sa0, sa1, sak = lora_A.stride()
    # Arguments a kernel does not read (bias, α with one branch, the seed at p = 0, dX when not wanted)
    # get a tensor of the call rather than None: one signature per variant under wrap_triton/Inductor.
    if plan.shrink is not None:
        s = plan.shrink
        wrap(s.kernel)[s.grid](x, lora_A, u, M, K, R, rank, sa0, sa1, sak, **s.meta)
    if plan.fwd is not None:
        f = plan.fwd
        dropout = p > 0.0
        if f.kernel is fwd_tma_kernel and x.device.type == "cuda":
            _ensure_allocator()
        sb0, sbn, sbr = lora_B.stride()
        args = (x, weight, weight if bias is None else bias, lora_A, u, lora_B, x if alpha is None else alpha, y,
                M, N, K, R, rank, plan.rows_per_image, scale, seed if dropout else x,
                _stream_mix(stream) if dropout else 0, plan.threshold, plan.keep_scale)
        if f.kernel is fwd_tma_kernel:
            wrap(f.kernel)[f.grid](*args, weight.stride(0), sa0, sa1, sak, sb0, sbn, sbr, **f.meta)
        else:
            wrap(f.kernel)[f.grid](*args, weight.stride(0), weight.stride(1), sa0, sa1, sak, sb0, sbn, sbr, **f.meta)
    return y, u


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
             alpha: torch.Tensor | None, u: torch.Tensor, scale: float, p: float, seed: torch.Tensor | None,
             stream: int, need_x: bool, table: dict | None = None, wrap: Callable = direct,
             design: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dX or None, dA, dB): dA in lora_A's dtype and shape, dB in lora_B's, both contiguous; W, b frozen.

    The one-pass design covers p = 0 with dX wanted; with dropout (masks would be hashed in the
    main loop, once per K-tile) or without dX (no dY W loop to share) the split kernels run.
    """
    if not (x.is_contiguous() and dy.is_contiguous() and u.is_contiguous()):
        raise ValueError("petal_linear (triton): x, dy and U must be row-major contiguous")
    tma_aligned = _aligned(x, weight, dy)
    design = design_for(x.device, "bwd", design)
    plan = _planned(_backward_plans, table is None and _static(x, alpha),
                    (x, weight, None, lora_A, lora_B, alpha, p, design, tma_aligned, need_x),
                    lambda: _backward_plan(x, weight, lora_A, lora_B, alpha, p, need_x, table, design, tma_aligned))
    (M, K), N = x.shape, weight.shape[0]
    rank = lora_A.shape[1]
    R = lora_A.shape[0] * rank
    dropout = p > 0.0
    ws = torch.empty(plan.ws_numel, dtype=torch.float32, device=x.device)
    ws.zero_()  # the one memset: dA and dB (and dT when split over N) are atomic sums
    db_off = R * K
    dx = torch.empty_like(x) if need_x else None
    sa0, sa1, sak = lora_A.stride()
    sb0, sbn, sbr = lora_B.stride()
    if plan.onepass is not None:
        o = plan.onepass
        wrap(o.kernel)[o.grid](dy, weight, lora_B, u, x if alpha is None else alpha, lora_A, x, dx, ws, ws,
                               M, N, K, R, rank, plan.rows_per_image, scale, db_off,
                               weight.stride(0), weight.stride(1), sb0, sbn, sbr,
                               sa0, sa1, sak, **o.meta)
    else:
        if plan.dt_in_ws:
            dt, dt_off = ws, R * (K + N)
        else:
            dt, dt_off = torch.empty((M, plan.rp), dtype=torch.float32, device=x.device), 0
        if plan.dy is not None:
            d = plan.dy
            wrap(d.kernel)[d.grid](dy, lora_B, u, x if alpha is None else alpha, dt, ws, M, N, R, rank,
                                   plan.rows_per_image, scale, seed if dropout else x,
                                   _stream_mix(stream) if dropout else 0, plan.threshold, plan.keep_scale,
                                   plan.dy_tiles_per_split, dt_off, db_off, sb0, sbn, sbr, **d.meta)
        if plan.dx is not None:
            d = plan.dx
            if d.kernel is bwd_dx_tma_kernel:
                if x.device.type == "cuda":
                    _ensure_allocator()
                wrap(d.kernel)[d.grid](dy, weight, dt, lora_A, x, dx, ws, M, N, K, R, rank, dt_off, weight.stride(0),
                                       sa0, sa1, sak, **d.meta)
            else:
                wrap(d.kernel)[d.grid](dy, weight, dt, lora_A, x, x if dx is None else dx, ws, M, N, K, R, rank,
                                       dt_off, weight.stride(0), weight.stride(1), sa0, sa1, sak, **d.meta)
    if plan.finalize is None:  # float32, workspace = [dA | dB]: the gradients are its two halves
        return dx, ws[:db_off].view(lora_A.shape), ws[db_off:].view(lora_B.shape)
    da = torch.empty(lora_A.shape, dtype=lora_A.dtype, device=x.device)
    db = torch.empty(lora_B.shape, dtype=lora_B.dtype, device=x.device)
    f = plan.finalize
    wrap(f.kernel)[f.grid](ws, da, db, R * K, R * (K + N), **f.meta)
    return dx, da, db
