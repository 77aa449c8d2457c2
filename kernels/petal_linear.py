"""Launchers of the fused PetalLinear Triton kernels, forward and backward (docs/design.md §1.1).

    y = x Wᵀ + b + s·(1 − α_i)·D₁(x A_lrᵀ B_lrᵀ) + s·α_i·D₂(x A_hrᵀ B_hrᵀ)

With U = x A_catᵀ (M × R, R = branches·r) and the per-row branch weights c = [s(1−α_i), sα_i]
(``coef[row // rows_per_image]``), two designs compute the same numbers (U is rounded to x's
dtype in both, so they agree to the accumulation order):

split (LoRAFusion's choice; 4 launches per step)
    forward   U = x A_catᵀ                                   (shrink_kernel)
              y = b + x Wᵀ + Σ_k D_k((c_k ⊙ U_k) B_kᵀ)        (fwd_kernel: one fp32 accumulator)
    backward  dU_k = D_k(dY) B_k,  dT = c ⊙ dU,
              dB_k = D_k(dY)ᵀ (c_k ⊙ U_k)                     (bwd_dy_kernel: one pass over dY)
              dX = dY W + dT A_cat,  dA = dTᵀ x               (bwd_dx_kernel: one accumulator)
one-pass (2 launches per step)
    forward   x Wᵀ and U = x A_catᵀ from the same x tiles, then the same epilogue; the first
              N-tile's programs store U for backward       (fwd_kernel, ONEPASS)
    backward  dY W and dU = dY B_cat from the same dY tiles; dB from the same tiles, each N-tile
              added by one K-tile column of programs; then dX and dA as above (bwd_onepass_kernel;
              p = 0 with dX wanted — otherwise the split kernels run)

In both, y is stored once and no M×N intermediate exists; with p > 0 each branch's product is
computed by its own small dot and masked before it is added (the masks differ per branch); with
p = 0 both branches are one dot and no hash is evaluated.

``use_design`` / ``PETAL_FAST_TRITON_DESIGN`` force either design; ``DEFAULT_DESIGN`` holds the
per-generation choice (kernels/petal_linear_config.py, with the tile table); why each generation's
choice is what it is, and the trade-off between the designs, is in docs/design.md.

Backward reductions over M (dB, dA) are fp32 atomics into zeroed buffers; dT is reduced over
N-splits with atomics only when the dY pass is split over N for occupancy. Atomics make dA/dB
bit-nondeterministic run to run (fp32 summation order), not inexact.

Ranks: R = branches·r ≤ 128 is padded to RP (a power of two ≥ 16, what ``tl.dot`` needs); the
padded columns are masked on load. Any M, K, N (masked edges); float32 (IEEE dot unless torch
allows TF32 matmuls), float16 and bfloat16 with fp32 accumulation.

Layout: the kernels are in ``petal_linear_kernels``, tiles and designs in ``petal_linear_config``,
the re-tuning and compile-check command in ``tune_petal_linear`` (``tune`` and ``compile_check``
stay importable from here). This module holds the launchers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._host import cdiv, direct
from ._rng import host_threshold
from .petal_linear_config import (  # noqa: F401  (re-exported: the public names of the Triton PetalLinear)
    DEFAULT_DESIGN, DESIGN_KERNELS, DESIGNS, DIRECTIONS, MAX_R, REDUCTION_BLOCK, TILE_CONFIGS, config_for,
    design_for, generation, padded_rank, sm_count, use_design)
from .petal_linear_kernels import bwd_dx_kernel, bwd_dy_kernel, bwd_onepass_kernel, fwd_kernel, shrink_kernel

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TOOL = ("tune", "compile_check", "CANDIDATES", "QUICK_CANDIDATES")  # kernels/tune_petal_linear.py


def __getattr__(name: str):
    """The tuning tool's names, importable from here as before (loaded on first use)."""
    if name in _TOOL:
        from . import tune_petal_linear
        return getattr(tune_petal_linear, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class LaunchParams:
    """What every launch of one forward or backward call shares, computed once per call."""
    branches: int
    rank: int              # per branch
    rows_per_image: int
    dropout: bool
    seed: torch.Tensor     # 1-element int64 on x's device: the kernels derive the branches' keys from it
    threshold: int         # keep an element when its hash is ≥ threshold
    keep_scale: float      # 1 / (1 − p)
    coef: torch.Tensor     # (images, branches) fp32, contiguous
    rp: int                # branches·rank padded for tl.dot
    precision: str         # tl.dot input_precision
    wrap: Callable = direct  # kernel → launchable: torch.library.wrap_triton inside a triton_op


def _precision(dtype: torch.dtype) -> str:
    """IEEE fp32 dots unless torch itself allows TF32 matmuls (same numbers as torch.matmul)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch_opts(cfg: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in cfg.items() if k != "programs_per_sm"}


def _check(x: torch.Tensor, a_cat: torch.Tensor, coef: torch.Tensor) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"petal_linear (triton): x must be float32, float16 or bfloat16, got {x.dtype}")
    if a_cat.shape[0] > MAX_R:
        raise ValueError(f"petal_linear (triton): branches·rank must be ≤ {MAX_R} (rank ≤ 64 per branch), "
                         f"got {a_cat.shape[0]}")
    if a_cat.shape[0] % coef.shape[1] or x.shape[0] % coef.shape[0]:
        raise ValueError("petal_linear (triton): coef must be (images, branches) dividing rows and A_cat rows")


def _seed_on(device: torch.device, seed: int | torch.Tensor) -> torch.Tensor:
    """The seed as the kernels read it: a 1-element int64 tensor on ``device`` (no host read of a tensor)."""
    if isinstance(seed, torch.Tensor):
        return seed.reshape(1).to(device=device, dtype=torch.int64)
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def launch_params(x: torch.Tensor, a_cat: torch.Tensor, coef: torch.Tensor, p: float, seed: int | torch.Tensor,
                  wrap: Callable = direct) -> LaunchParams:
    """The launch parameters of one call: shapes of the branches, dropout seed, coefficients, precision."""
    branches = coef.shape[1]
    dropout = p > 0.0
    coef32 = coef.to(torch.float32).contiguous()
    return LaunchParams(branches=branches, rank=a_cat.shape[0] // branches,
                        rows_per_image=x.shape[0] // coef.shape[0], dropout=dropout,
                        seed=_seed_on(x.device, seed) if dropout else coef32,  # p = 0: never read
                        threshold=host_threshold(p) if dropout else 0, keep_scale=1.0 / (1.0 - p),
                        coef=coef32, rp=padded_rank(a_cat.shape[0]), precision=_precision(x.dtype), wrap=wrap)


def _launch_shrink(x, a_cat, u, params, cfg) -> None:
    M, K = x.shape
    grid = (cdiv(M, cfg["BLOCK_M"]),)
    params.wrap(shrink_kernel)[grid](x, a_cat, u, M, K, a_cat.shape[0], x.stride(0), x.stride(1), a_cat.stride(0),
                        a_cat.stride(1), u.stride(0), RP=params.rp, PRECISION=params.precision,
                        **_launch_opts(cfg))


def _launch_fwd(x, weight, bias, a_cat, u, b_cat, y, params, cfg, onepass: bool) -> None:
    M, K = x.shape
    N = weight.shape[0]
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    params.wrap(fwd_kernel)[grid](x, weight, bias if bias is not None else weight, a_cat, u, b_cat, params.coef, y,
                     M, N, K, u.shape[1], params.rank, params.rows_per_image, params.seed,
                     params.threshold, params.keep_scale,
                     x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), a_cat.stride(0),
                     a_cat.stride(1), u.stride(0), b_cat.stride(0), b_cat.stride(1), y.stride(0),
                     BRANCHES=params.branches, HAS_BIAS=bias is not None, DROPOUT=params.dropout,
                     ONEPASS=onepass, RP=params.rp, PRECISION=params.precision, **_launch_opts(cfg))


def _launch_bwd_onepass(dy, weight, b_cat, u, a_cat, x, dx, da, db, params, cfg) -> None:
    M, K = x.shape
    N = weight.shape[0]
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(K, cfg["BLOCK_K"]),)
    params.wrap(bwd_onepass_kernel)[grid](dy, weight, b_cat, u, params.coef, a_cat, x, dx, da, db, M, N, K, a_cat.shape[0],
                             params.rank, params.rows_per_image,
                             dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), b_cat.stride(0),
                             b_cat.stride(1), u.stride(0), a_cat.stride(0), a_cat.stride(1), x.stride(0),
                             x.stride(1), dx.stride(0),
                             BRANCHES=params.branches, RP=params.rp, PRECISION=params.precision,
                             **_launch_opts(cfg))


def _dy_split(m_tiles, n_tiles: int, target: int):
    """(programs over N, N-tiles per program, atomic dT?) for the dY pass: enough programs to fill
    the device (SymInt arithmetic: M may be symbolic in a traced graph with a dynamic batch). dT is
    atomic when N is split; with M symbolic, whenever N has more than one tile (correct for any
    split, no guard on M)."""
    split = torch.sym_max(1, torch.sym_min(n_tiles, cdiv(target, m_tiles)))
    per = cdiv(n_tiles, split)
    split = cdiv(n_tiles, per)
    return split, per, (split > 1) if isinstance(m_tiles, int) else n_tiles > 1


def _launch_bwd_dy(dy, b_cat, u, dt, db, params, cfg) -> None:
    M, N = dy.shape
    m_tiles, n_tiles = cdiv(M, cfg["BLOCK_M"]), cdiv(N, cfg["BLOCK_N"])
    split, tiles_per_split, atomic = _dy_split(m_tiles, n_tiles, cfg["programs_per_sm"] * sm_count(dy.device))
    if atomic:
        dt.zero_()
    params.wrap(bwd_dy_kernel)[(m_tiles, split)](dy, b_cat, u, params.coef, dt, db, M, N, u.shape[1],
                                                 params.rank, params.rows_per_image, params.seed,
                                                 params.threshold, params.keep_scale, tiles_per_split,
                                                 dy.stride(0), dy.stride(1), b_cat.stride(0), b_cat.stride(1),
                                                 u.stride(0), BRANCHES=params.branches, DROPOUT=params.dropout,
                                                 ATOMIC_DT=atomic, RP=params.rp, PRECISION=params.precision,
                                                 **_launch_opts(cfg))


def _launch_bwd_dx(dy, weight, dt, a_cat, x, dx, da, params, cfg) -> None:
    M, K = x.shape
    N = weight.shape[0]
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(K, cfg["BLOCK_K"]),)
    out = dx if dx is not None else x  # unused pointer when dX is not wanted
    params.wrap(bwd_dx_kernel)[grid](dy, weight, dt, a_cat, x, out, da, M, N, K, a_cat.shape[0],
                        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), a_cat.stride(0),
                        a_cat.stride(1), x.stride(0), x.stride(1), out.stride(0),
                        COMPUTE_DX=dx is not None, RP=params.rp, PRECISION=params.precision,
                        **_launch_opts(cfg))


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a_cat: torch.Tensor,
            b_cat: torch.Tensor, coef: torch.Tensor, p: float, seed: int | torch.Tensor,
            table: dict | None = None, wrap: Callable = direct) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, U): y = b + x Wᵀ + Σ_k D_k((c_k ⊙ U_k) B_kᵀ), U = x A_catᵀ (M × R, x's dtype, unscaled).

    ``seed``: an int, or a 1-element integer tensor (read by the kernels on the device);
    ``wrap``: applied to each kernel before its launch (``torch.library.wrap_triton`` in a triton_op).
    """
    _check(x, a_cat, coef)
    M, N = x.shape[0], weight.shape[0]
    params = launch_params(x, a_cat, coef, p, seed, wrap)
    u = torch.empty((M, a_cat.shape[0]), dtype=x.dtype, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y, u
    if N and design_for(x.device, "fwd") == "onepass":
        cfg = config_for("fwd_onepass", x.device, x.dtype, table, params.dropout)
        _launch_fwd(x, weight, bias, a_cat, u, b_cat, y, params, cfg, onepass=True)
        return y, u
    _launch_shrink(x, a_cat, u, params, config_for("shrink", x.device, x.dtype, table))
    if N:
        cfg = config_for("fwd", x.device, x.dtype, table, params.dropout)
        _launch_fwd(x, weight, bias, a_cat, u, b_cat, y, params, cfg, onepass=False)
    return y, u


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor,
             coef: torch.Tensor, u: torch.Tensor, p: float, seed: int | torch.Tensor, need_x: bool,
             table: dict | None = None,
             wrap: Callable = direct) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dX or None, dA_cat (R × K), dB_cat (N × R)) in x's dtype, three separate tensors; W, b frozen.

    The one-pass design covers p = 0 with dX wanted; with dropout (masks would be hashed in the
    main loop, once per K-tile) or without dX (no dY W loop to share) the split kernels run.
    """
    _check(x, a_cat, coef)
    M, K = x.shape
    N, R = weight.shape[0], a_cat.shape[0]
    params = launch_params(x, a_cat, coef, p, seed, wrap)
    # dB and dA are reductions over M: fp32 atomics into zeroed buffers
    db = torch.zeros((N, R), dtype=torch.float32, device=x.device)
    da = torch.zeros((R, K), dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x) if need_x else None
    if M and N and K and need_x and not params.dropout and design_for(x.device, "bwd") == "onepass":
        _launch_bwd_onepass(dy, weight, b_cat, u, a_cat, x, dx, da, db, params,
                            config_for("bwd_onepass", x.device, x.dtype, table))
        return dx, da.to(x.dtype), db.to(x.dtype)
    # dT = c ⊙ dU (fp32, padded to RP): the dY pass writes every row (zeroing first when it splits N)
    dt = (torch.empty if N else torch.zeros)((M, params.rp), dtype=torch.float32, device=x.device)
    if M and N:
        _launch_bwd_dy(dy, b_cat, u, dt, db, params, config_for("bwd_dy", x.device, x.dtype, table))
    if M and K:
        _launch_bwd_dx(dy, weight, dt, a_cat, x, dx, da, params, config_for("bwd_dx", x.device, x.dtype, table))
    elif dx is not None:
        dx.zero_()
    return dx, da.to(x.dtype), db.to(x.dtype)
