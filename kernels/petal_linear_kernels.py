"""The PetalLinear Triton kernels with pointer loads (every GPU, and the interpreter), in the order of the math.

    forward   U = x A_catᵀ (shrink_kernel); y = b + x Wᵀ + Σ_k D_k((c_k ⊙ U_k) B_kᵀ) (fwd_kernel,
              which with ONEPASS also computes U from its own x tiles)
    backward  dT = c ⊙ D(dY) B_cat, dB += D(dY)ᵀ V (bwd_dy_kernel);
              dX = dY W + dT A_cat, dA += dTᵀ x (bwd_dx_kernel); both in one (bwd_onepass_kernel, p = 0);
              the fp32 gradient workspace cast to the parameters' dtype (finalize_kernel)

A_cat / B_cat are never built: row j = k·r + i of A_cat is lora_A[k, i] and column j of B_cat is
lora_B[k, :, i], read through the parameters' strides (``_lora_offsets``). c are the per-row branch
weights computed here from α (``row_coef``), V = c ⊙ U, D_k branch k's dropout mask (kernels/_rng.py).
All products accumulate in fp32; reductions over M (dB, dA, and dT when N is split) are fp32
atomics into the workspace, dA and dB in the parameters' layout. The Hopper GEMMs with TMA
descriptors (kernels/petal_linear_tma.py) share the helpers defined here.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._rng import branch_keys, keep_mask


@triton.jit
def tile_ids(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """GROUP_M swizzle: consecutive tiles share row panels, so x / W tiles are reused from L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % size_m
    pid_n = (tile % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def lora_offsets(offs_r, rank, s_branch, s_rank):
    """Offsets of rows j = branch·rank + i of A_cat (columns of B_cat) in a parameter with strides
    (s_branch, ·, s_rank) over (branch, ·, i) — lora_A is (branches, r, K), lora_B (branches, N, r)."""
    return (offs_r // rank) * s_branch + (offs_r % rank) * s_rank


@triton.jit
def row_coef(alpha_ptr, offs_m, m_ok, offs_r, rank, rows_per_image, scale, BRANCHES: tl.constexpr):
    """Branch weights of the (offs_m × offs_r) block, fp32: s·(1 − α_i) in the lr columns, s·α_i in
    the hr columns (i = row // rows_per_image); the scalar s with one branch."""
    if BRANCHES == 2:
        a = tl.load(alpha_ptr + offs_m // rows_per_image, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        c = tl.where((offs_r >= rank)[None, :], scale * a, scale * (1.0 - a))
    else:
        c = scale
    return c


@triton.jit
def scaled_u(u, u_ptr, offs_m, m_ok, offs_r, r_ok, R, rank, rows_per_image, scale, alpha_ptr, pid_n,
             BRANCHES: tl.constexpr, ONEPASS: tl.constexpr):
    """V = c ⊙ U of a row tile, fp32. One-pass: ``u`` was accumulated by the caller; the programs of the
    first N-tile store it for backward, and V uses it rounded as stored (both designs give the same y).
    Split: U is loaded from the shrink kernel's output (``u`` unused)."""
    ur_ok = m_ok[:, None] & r_ok[None, :]
    u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * R + offs_r[None, :]
    if ONEPASS:
        if pid_n == 0:
            tl.store(u_ptrs, u.to(u_ptr.dtype.element_ty), mask=ur_ok)
        u = u.to(u_ptr.dtype.element_ty).to(tl.float32)
    else:
        u = tl.load(u_ptrs, mask=ur_ok, other=0.0).to(tl.float32)
    return u * row_coef(alpha_ptr, offs_m, m_ok, offs_r, rank, rows_per_image, scale, BRANCHES)


@triton.jit
def branch_keep(key0, key1, offs_m, offs_n, threshold, BRANCH: tl.constexpr):
    """Branch BRANCH's keep mask over the (offs_m × offs_n) tile: each branch hashes its own key."""
    if BRANCH == 0:
        keep = keep_mask(key0, offs_m, offs_n, threshold)
    else:
        keep = keep_mask(key1, offs_m, offs_n, threshold)
    return keep


@triton.jit
def branch_cols(offs_r, rank, BRANCH: tl.constexpr):
    """Which of the RP columns of U / B_cat belong to branch BRANCH."""
    return (offs_r >= BRANCH * rank) & (offs_r < (BRANCH + 1) * rank)


@triton.jit
def lora_expand(acc, v, bt, offs_m, offs_n, offs_r, rank, key0, key1, threshold, keep_scale,
                BRANCHES: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + Σ_k D_k(V_k B_kᵀ) for V (BLOCK_M × RP, fp32) and the B_catᵀ tile bt (RP × BLOCK_N).

    Without dropout both branches are one more K step of the accumulator; with dropout each branch
    is its own product, masked before it is added (the masks differ per branch)."""
    if DROPOUT:
        for br in tl.static_range(BRANCHES):
            in_br = branch_cols(offs_r, rank, br)
            part = tl.dot(tl.where(in_br[None, :], v, 0.0).to(bt.dtype), bt, input_precision=PRECISION)
            keep = branch_keep(key0, key1, offs_m, offs_n, threshold, br)
            acc += tl.where(keep, part * keep_scale, 0.0)
    else:
        acc = tl.dot(v.to(bt.dtype), bt, acc, input_precision=PRECISION)
    return acc


@triton.jit
def shrink_kernel(x_ptr, a_ptr, u_ptr, M, K, R, rank, s_a0, s_a1, s_ak,
                  RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """U = x A_catᵀ for one block of rows (x and U row-major; U in x's dtype, unscaled)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, RP)
    m_ok, r_ok = offs_m < M, offs_r < R
    rows = offs_m.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * K + offs_k[None, :]
    a_ptrs = a_ptr + lora_offsets(offs_r, rank, s_a0, s_a1)[None, :] + offs_k[:, None] * s_ak  # A_catᵀ (BK × RP)
    acc = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K * s_ak
    tl.store(u_ptr + rows[:, None] * R + offs_r[None, :], acc.to(u_ptr.dtype.element_ty),
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit(do_not_specialize=["stream_mix", "threshold"])
def fwd_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, u_ptr, b_ptr, alpha_ptr, y_ptr,
               M, N, K, R, rank, rows_per_image, scale, seed_ptr, stream_mix, threshold, keep_scale,
               s_wn, s_wk, s_a0, s_a1, s_ak, s_b0, s_bn, s_br,
               BRANCHES: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ONEPASS: tl.constexpr,
               RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """One y tile: x Wᵀ, then Σ_k D_k((c_k ⊙ U_k) B_kᵀ) in the same accumulator, then bias.

    Split design: U is read from the shrink kernel's output. One-pass (ONEPASS): U = x A_catᵀ is
    accumulated from the x tiles the base GEMM loads anyway (recomputed by every N-tile: RP/BLOCK_N
    extra tensor-core work), and the programs of the first N-tile store it for backward.
    """
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, RP)
    m_ok, n_ok, r_ok = offs_m < M, offs_n < N, offs_r < R
    rows = offs_m.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * K + offs_k[None, :]
    w_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * s_wn + offs_k[:, None] * s_wk  # Wᵀ tile (BLOCK_K × BLOCK_N)
    a_ptrs = a_ptr + lora_offsets(offs_r, rank, s_a0, s_a1)[None, :] + offs_k[:, None] * s_ak  # A_catᵀ
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
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * s_wk

    # LoRA expand: V = c ⊙ U (per row, per branch), then V B_catᵀ into the same accumulator
    v = scaled_u(u, u_ptr, offs_m, m_ok, offs_r, r_ok, R, rank, rows_per_image, scale, alpha_ptr, pid_n,
                 BRANCHES, ONEPASS)
    bt = tl.load(b_ptr + lora_offsets(offs_r, rank, s_b0, s_br)[:, None] + offs_n[None, :] * s_bn,
                 mask=r_ok[:, None] & n_ok[None, :], other=0.0)                  # B_catᵀ tile (RP × BLOCK_N)
    key0, key1 = branch_keys(seed_ptr, stream_mix, DROPOUT)
    acc = lora_expand(acc, v, bt, offs_m, offs_n, offs_r, rank, key0, key1, threshold, keep_scale,
                      BRANCHES, DROPOUT, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["stream_mix", "threshold"])
def bwd_dy_kernel(dy_ptr, b_ptr, u_ptr, alpha_ptr, dt_ptr, db_ptr,
                  M, N, R, rank, rows_per_image, scale, seed_ptr, stream_mix, threshold, keep_scale,
                  tiles_per_split, dt_off, db_off, s_b0, s_bn, s_br,
                  BRANCHES: tl.constexpr, DROPOUT: tl.constexpr, ATOMIC_DT: tl.constexpr, RP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One pass over a (BLOCK_M rows × a range of N) slab of dY: dT = c ⊙ D(dY) B_cat, dB += D(dY)ᵀ V.

    dT (M × RP, fp32, at dt_ptr + dt_off) is stored, or atomically added when N is split over programs;
    dB is always atomically added (a reduction over M) to the fp32 workspace at db_ptr + db_off, in
    lora_B's layout (branches, N, r). (Offsets into one workspace rather than views of it: a traced
    graph then sees one buffer written, not views scattered back.)
    """
    dt_ptr += dt_off
    db_ptr += db_off
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, RP)
    m_ok, r_ok = offs_m < M, offs_r < R
    rows = offs_m.to(tl.int64)
    ur_ok = m_ok[:, None] & r_ok[None, :]
    u = tl.load(u_ptr + rows[:, None] * R + offs_r[None, :], mask=ur_ok, other=0.0)
    c = row_coef(alpha_ptr, offs_m, m_ok, offs_r, rank, rows_per_image, scale, BRANCHES)
    v = (u.to(tl.float32) * c).to(dy_ptr.dtype.element_ty)
    key0, key1 = branch_keys(seed_ptr, stream_mix, DROPOUT)
    b_cols = lora_offsets(offs_r, rank, s_b0, s_br)
    db_cols = lora_offsets(offs_r, rank, N * rank, 1)

    du = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    first = tl.program_id(1) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(N, BLOCK_N))
    for t in range(first, last):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(dy_ptr + rows[:, None] * N + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * s_bn + b_cols[None, :],
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)                # B_cat tile (BLOCK_N × RP)
        if DROPOUT:
            db = tl.zeros((BLOCK_N, RP), dtype=tl.float32)
            for br in tl.static_range(BRANCHES):
                in_br = branch_cols(offs_r, rank, br)
                keep = branch_keep(key0, key1, offs_m, offs_n, threshold, br)
                dyk = tl.where(keep, dy.to(tl.float32) * keep_scale, 0.0).to(dy.dtype)
                du = tl.dot(dyk, tl.where(in_br[None, :], b, tl.zeros_like(b)), du, input_precision=PRECISION)
                db = tl.dot(tl.trans(dyk), tl.where(in_br[None, :], v, tl.zeros_like(v)), db,
                            input_precision=PRECISION)
        else:
            du = tl.dot(dy, b, du, input_precision=PRECISION)
            db = tl.dot(tl.trans(dy), v, input_precision=PRECISION)
        tl.atomic_add(db_ptr + offs_n[:, None] * rank + db_cols[None, :], db, mask=n_ok[:, None] & r_ok[None, :],
                      sem="relaxed")

    dt = du * c  # dT = c ⊙ dU: linear, so N-split partials can be scaled before they are summed
    dt_ptrs = dt_ptr + rows[:, None] * RP + offs_r[None, :]
    if ATOMIC_DT:
        tl.atomic_add(dt_ptrs, dt, mask=ur_ok, sem="relaxed")
    else:
        tl.store(dt_ptrs, dt, mask=ur_ok)


@triton.jit
def dx_da_epilogue(acc, dt, a_ptr, xt, rows, offs_k, offs_r, m_ok, k_ok, r_ok, K, rank, s_a0, s_a1, s_ak,
                   dx_ptr, da_ptr, COMPUTE_DX: tl.constexpr, PRECISION: tl.constexpr):
    """Backward epilogue of a (BLOCK_M × BLOCK_K) tile: dX = acc + dT A_cat stored (acc = dY W;
    returned, for a caller that stores it itself when dx_ptr is None), and this tile's share dTᵀ x
    atomically added to dA (fp32, lora_A's layout: row j of A_cat is row j of the (R × K) block)."""
    if COMPUTE_DX:
        a = tl.load(a_ptr + lora_offsets(offs_r, rank, s_a0, s_a1)[:, None] + offs_k[None, :] * s_ak,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)              # A_cat tile (RP × BLOCK_K)
        acc = tl.dot(dt, a, acc, input_precision=PRECISION)
        if dx_ptr is not None:
            tl.store(dx_ptr + rows[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & k_ok[None, :])
    da = tl.dot(tl.trans(dt), xt, input_precision=PRECISION)
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da, mask=r_ok[:, None] & k_ok[None, :],
                  sem="relaxed")
    return acc


@triton.jit
def bwd_dx_kernel(dy_ptr, w_ptr, dt_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
                  M, N, K, R, rank, dt_off, s_wn, s_wk, s_a0, s_a1, s_ak,
                  COMPUTE_DX: tl.constexpr, RP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  PRECISION: tl.constexpr):
    """One (BLOCK_M × BLOCK_K) tile of dX = dY W + dT A_cat (one accumulator) and its dA += dTᵀ x part
    (dT at dt_ptr + dt_off, dA at da_ptr)."""
    dt_ptr += dt_off
    pid_m, pid_k = tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
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
        dy_ptrs = dy_ptr + rows[:, None] * N + offs_n[None, :]
        w_ptrs = w_ptr + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk        # W tile (BLOCK_N × BLOCK_K)
        for n0 in range(0, N, BLOCK_N):
            n_ok = offs_n < N - n0
            dyt = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)
            dy_ptrs += BLOCK_N
            w_ptrs += BLOCK_N * s_wn
    xt = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    dx_da_epilogue(acc, dt, a_ptr, xt, rows, offs_k, offs_r, m_ok, k_ok, r_ok, K, rank, s_a0, s_a1, s_ak,
                   dx_ptr, da_ptr, COMPUTE_DX, PRECISION)


@triton.jit
def bwd_onepass_kernel(dy_ptr, w_ptr, b_ptr, u_ptr, alpha_ptr, a_ptr, x_ptr, dx_ptr, da_ptr, db_ptr,
                       M, N, K, R, rank, rows_per_image, scale, db_off,
                       s_wn, s_wk, s_b0, s_bn, s_br, s_a0, s_a1, s_ak,
                       BRANCHES: tl.constexpr, RP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, PRECISION: tl.constexpr):
    """One-pass design (p = 0), one (BLOCK_M × BLOCK_K) tile of dX and its shares of dA and dB.

    The loop over N that computes dY W also computes dU = dY B_cat from the same dY tiles (each
    K-tile recomputes it: RP/BLOCK_K extra tensor-core work instead of the split design's extra
    pass over dY); dB += dYᵀ V for N-tile t is added by the programs with t ≡ pid_k (mod #K-tiles),
    so every (M-tile, N-tile) pair is counted once (every program computes the product, see the
    loop: another RP/BLOCK_K of tensor-core work).
    Then dT = c ⊙ dU, dX = dY W + dT A_cat (one accumulator), dA += dTᵀ x (dB at db_ptr + db_off).
    """
    db_ptr += db_off
    pid_m, pid_k = tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RP)
    m_ok, k_ok, r_ok = offs_m < M, offs_k < K, offs_r < R
    rows = offs_m.to(tl.int64)
    ur_ok = m_ok[:, None] & r_ok[None, :]
    u = tl.load(u_ptr + rows[:, None] * R + offs_r[None, :], mask=ur_ok, other=0.0)
    c = row_coef(alpha_ptr, offs_m, m_ok, offs_r, rank, rows_per_image, scale, BRANCHES)
    v = (u.to(tl.float32) * c).to(dy_ptr.dtype.element_ty)
    db_cols = lora_offsets(offs_r, rank, N * rank, 1)

    dy_ptrs = dy_ptr + rows[:, None] * N + offs_n[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * s_wn + offs_k[None, :] * s_wk            # W tile (BLOCK_N × BLOCK_K)
    b_ptrs = b_ptr + offs_n[:, None] * s_bn + lora_offsets(offs_r, rank, s_b0, s_br)[None, :]  # B_cat tile
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
        tl.atomic_add(db_ptr + (t * BLOCK_N + offs_n)[:, None] * rank + db_cols[None, :], db,
                      mask=n_own[:, None] & r_ok[None, :], sem="relaxed")
        dy_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * s_wn
        b_ptrs += BLOCK_N * s_bn

    dt = (du * c).to(x_ptr.dtype.element_ty)
    xt = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    dx_da_epilogue(acc, dt, a_ptr, xt, rows, offs_k, offs_r, m_ok, k_ok, r_ok, K, rank, s_a0, s_a1, s_ak,
                   dx_ptr, da_ptr, True, PRECISION)


@triton.jit
def finalize_kernel(ws_ptr, da_ptr, db_ptr, n_a, n_all, BLOCK: tl.constexpr):
    """Cast the fp32 workspace [dA | dB] (both in the parameters' layout) to the parameters' dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(ws_ptr + offs, mask=offs < n_all)
    tl.store(da_ptr + offs, g.to(da_ptr.dtype.element_ty), mask=offs < n_a)
    tl.store(db_ptr + (offs - n_a), g.to(db_ptr.dtype.element_ty), mask=(offs >= n_a) & (offs < n_all))
