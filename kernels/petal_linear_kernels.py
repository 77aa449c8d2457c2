"""The PetalLinear Triton kernels, in the order of the math (the designs: kernels/petal_linear.py).

    forward   U = x A_catᵀ (shrink_kernel); y = b + x Wᵀ + Σ_k D_k((c_k ⊙ U_k) B_kᵀ) (fwd_kernel,
              which with ONEPASS also computes U from its own x tiles)
    backward  dT = c ⊙ D(dY) B_cat, dB += D(dY)ᵀ V (bwd_dy_kernel);
              dX = dY W + dT A_cat, dA += dTᵀ x (bwd_dx_kernel); both in one (bwd_onepass_kernel, p = 0)

c are the per-row branch weights, V = c ⊙ U, D_k branch k's dropout mask (kernels/_rng.py). All
products accumulate in fp32; reductions over M (dB, dA, and dT when N is split) are fp32 atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._rng import branch_keys, keep_mask


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
def _branch_keep(key0, key1, offs_m, offs_n, threshold, BRANCH: tl.constexpr):
    """Branch BRANCH's keep mask over the (offs_m × offs_n) tile: each branch hashes its own key."""
    if BRANCH == 0:
        keep = keep_mask(key0, offs_m, offs_n, threshold)
    else:
        keep = keep_mask(key1, offs_m, offs_n, threshold)
    return keep


@triton.jit
def _branch_cols(offs_r, rank, BRANCH: tl.constexpr):
    """Which of the RP columns of U / B_cat belong to branch BRANCH."""
    return (offs_r >= BRANCH * rank) & (offs_r < (BRANCH + 1) * rank)


@triton.jit
def shrink_kernel(x_ptr, a_ptr, u_ptr, M, K, R,
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
            in_br = _branch_cols(offs_r, rank, br)
            part = tl.dot(tl.where(in_br[None, :], v, 0.0).to(bt.dtype), bt, input_precision=PRECISION)
            keep = _branch_keep(key0, key1, offs_m, offs_n, threshold, br)
            acc += tl.where(keep, part * keep_scale, 0.0)
    else:
        acc = tl.dot(v.to(bt.dtype), bt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * s_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def fwd_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, u_ptr, b_ptr, coef_ptr, y_ptr,
               M, N, K, R, rank, rows_per_image, seed_ptr, threshold, keep_scale,
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
    key0, key1 = branch_keys(seed_ptr, DROPOUT)
    _expand_bias_store(acc, u * c, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, m_ok, n_ok, r_ok, rows,
                       rank, key0, key1, threshold, keep_scale, s_bn, s_br, s_ym,
                       BRANCHES, HAS_BIAS, DROPOUT, PRECISION)


@triton.jit
def bwd_dy_kernel(dy_ptr, b_ptr, u_ptr, coef_ptr, dt_ptr, db_ptr,
                  M, N, R, rank, rows_per_image, seed_ptr, threshold, keep_scale, tiles_per_split,
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
    key0, key1 = branch_keys(seed_ptr, DROPOUT)

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
                in_br = _branch_cols(offs_r, rank, br)
                keep = _branch_keep(key0, key1, offs_m, offs_n, threshold, br)
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
def bwd_dx_kernel(dy_ptr, w_ptr, dt_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
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
def bwd_onepass_kernel(dy_ptr, w_ptr, b_ptr, u_ptr, coef_ptr, a_ptr, x_ptr, dx_ptr, da_ptr, db_ptr,
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
