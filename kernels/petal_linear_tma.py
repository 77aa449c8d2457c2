"""The Hopper (sm_90) main loop of the PetalLinear GEMMs: persistent kernels fed by TMA descriptors.

    fwd_tma_kernel      y = b + x Wᵀ + Σ_k D_k((c_k ⊙ U_k) B_kᵀ)    (ONEPASS: U = x A_catᵀ in the same loop)
    bwd_dx_tma_kernel   dX = dY W + dT A_cat,  dA += dTᵀ x

Same math, arguments and numbers as ``fwd_kernel`` / ``bwd_dx_kernel`` (kernels/petal_linear_kernels.py,
whose helpers they share); what differs is how tiles move:

- persistent: the grid is at most the SM count (``programs_per_sm`` × SMs) and each program walks the
  output tiles ``tile = pid, pid + #programs, …`` (GROUP_M swizzled), so a grid is one wave and a
  tile boundary costs no launch or CTA start-up; FLATTEN (a tile-table key) flattens the tile and K
  loops for the software pipeliner, which then prefetches the next tile's first K steps during the
  epilogue (off in the table: ptxas serialises the wgmma pipeline of the flattened loops, C7514/C7515);
- the big operands (x, W, dY) arrive by TMA from device-side tensor descriptors
  (``tl.make_tensor_descriptor``: the kernels take plain pointers, so a launch is the same call under
  ``torch.library.wrap_triton`` / Inductor and in a CUDA graph; the descriptors live in a 128-byte
  global scratch per program that the launch allocates through ``triton.set_allocator``); out-of-range
  rows and columns are zero-filled by the TMA unit instead of masked loads;
- y and dX leave by TMA stores; the small LoRA operands (A_cat, B_cat: any strides of the parameters,
  U, dT) and the per-row α stay pointer loads;
- the LoRA expand is one more K step (K = RP) of the same accumulator; with dropout it is computed per
  branch in the epilogue, one EPI_SPLIT-th of the tile's columns at a time, so the mask hashing of a
  128 × 256 tile needs the registers of a 128 × 64 one and the p > 0 tiles do not spill.

TMA needs a 16-byte aligned base and 16-byte aligned row strides (K, N multiples of 8 in 16-bit
types) with unit inner stride; the launchers check this and take the pointer kernels otherwise.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._rng import branch_keys
from .petal_linear_kernels import dx_da_epilogue, lora_expand, lora_offsets, scaled_u, tile_ids


@triton.jit
def _halves(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right column halves of a (BLOCK_M × BLOCK_N) tile."""
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _store_part(acc, v, y_desc, off_m, off_n, offs_m, offs_r, r_ok, N, rank, b_ptr, bias_ptr, s_b0, s_bn, s_br,
                key0, key1, threshold, keep_scale, BRANCHES: tl.constexpr, HAS_BIAS: tl.constexpr,
                DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """Finish and store the (BLOCK_M × width) part of a y tile at column ``off_n``: with dropout the
    masked LoRA branches (V = c ⊙ U), then the bias, then one TMA store."""
    offs_n = off_n + tl.arange(0, acc.shape[1])
    n_ok = offs_n < N
    if DROPOUT:
        bt = tl.load(b_ptr + lora_offsets(offs_r, rank, s_b0, s_br)[:, None] + offs_n[None, :] * s_bn,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)              # B_catᵀ part (RP × width)
        acc = lora_expand(acc, v, bt, offs_m, offs_n, offs_r, rank, key0, key1, threshold, keep_scale,
                          BRANCHES, True, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


@triton.jit(do_not_specialize=["stream_mix", "threshold"])
def fwd_tma_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, u_ptr, b_ptr, alpha_ptr, y_ptr,
                   M, N, K, R, rank, rows_per_image, scale, seed_ptr, stream_mix, threshold, keep_scale,
                   s_wn, s_a0, s_a1, s_ak, s_b0, s_bn, s_br,
                   BRANCHES: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, ONEPASS: tl.constexpr,
                   RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, EPI_SPLIT: tl.constexpr, FLATTEN: tl.constexpr, PRECISION: tl.constexpr):
    """Persistent forward: for each (BLOCK_M × BLOCK_N) tile of y, x Wᵀ from TMA tiles (and U = x A_catᵀ
    with ONEPASS; the programs of the first N-tile store it), the LoRA expand, bias, TMA store."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[s_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[N, 1],
                                       block_shape=[BLOCK_M, BLOCK_N // EPI_SPLIT])
    key0, key1 = branch_keys(seed_ptr, stream_mix, DROPOUT)
    offs_r = tl.arange(0, RP)
    r_ok = offs_r < R
    a_rows = lora_offsets(offs_r, rank, s_a0, s_a1)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = tile_ids(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            xt = x_desc.load([off_m, off_k])
            wt = w_desc.load([off_n, off_k])
            acc = tl.dot(xt, wt.T, acc, input_precision=PRECISION)
            if ONEPASS:
                offs_k = off_k + tl.arange(0, BLOCK_K)
                at = tl.load(a_ptr + a_rows[None, :] + offs_k[:, None] * s_ak,
                             mask=(offs_k < K)[:, None] & r_ok[None, :], other=0.0)  # A_catᵀ (BLOCK_K × RP)
                u = tl.dot(xt, at, u, input_precision=PRECISION)

        offs_m = off_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        v = scaled_u(u, u_ptr, offs_m, m_ok, offs_r, r_ok, R, rank, rows_per_image, scale, alpha_ptr, pid_n,
                     BRANCHES, ONEPASS)
        if not DROPOUT:  # the expand: one more K step (K = RP) of the same accumulator
            offs_n = off_n + tl.arange(0, BLOCK_N)
            bt = tl.load(b_ptr + lora_offsets(offs_r, rank, s_b0, s_br)[:, None] + offs_n[None, :] * s_bn,
                         mask=r_ok[:, None] & (offs_n < N)[None, :], other=0.0)  # B_catᵀ tile (RP × BLOCK_N)
            acc = tl.dot(v.to(bt.dtype), bt, acc, input_precision=PRECISION)
        if EPI_SPLIT == 1:
            _store_part(acc, v, y_desc, off_m, off_n, offs_m, offs_r, r_ok, N, rank, b_ptr, bias_ptr,
                        s_b0, s_bn, s_br, key0, key1, threshold, keep_scale, BRANCHES, HAS_BIAS, DROPOUT, PRECISION)
        else:
            left, right = _halves(acc, BLOCK_M, BLOCK_N)
            HALF: tl.constexpr = BLOCK_N // 2
            if EPI_SPLIT == 2:
                _store_part(left, v, y_desc, off_m, off_n, offs_m, offs_r, r_ok, N, rank, b_ptr, bias_ptr,
                            s_b0, s_bn, s_br, key0, key1, threshold, keep_scale, BRANCHES, HAS_BIAS, DROPOUT,
                            PRECISION)
                _store_part(right, v, y_desc, off_m, off_n + HALF, offs_m, offs_r, r_ok, N, rank, b_ptr,
                            bias_ptr, s_b0, s_bn, s_br, key0, key1, threshold, keep_scale, BRANCHES, HAS_BIAS,
                            DROPOUT, PRECISION)
            else:  # EPI_SPLIT == 4
                QUARTER: tl.constexpr = BLOCK_N // 4
                q0, q1 = _halves(left, BLOCK_M, HALF)
                q2, q3 = _halves(right, BLOCK_M, HALF)
                _store_part(q0, v, y_desc, off_m, off_n, offs_m, offs_r, r_ok, N, rank, b_ptr, bias_ptr,
                            s_b0, s_bn, s_br, key0, key1, threshold, keep_scale, BRANCHES, HAS_BIAS, DROPOUT,
                            PRECISION)
                _store_part(q1, v, y_desc, off_m, off_n + QUARTER, offs_m, offs_r, r_ok, N, rank, b_ptr, bias_ptr,
                            s_b0, s_bn, s_br, key0, key1, threshold, keep_scale, BRANCHES, HAS_BIAS, DROPOUT,
                            PRECISION)
                _store_part(q2, v, y_desc, off_m, off_n + HALF, offs_m, offs_r, r_ok, N, rank, b_ptr, bias_ptr,
                            s_b0, s_bn, s_br, key0, key1, threshold, keep_scale, BRANCHES, HAS_BIAS, DROPOUT,
                            PRECISION)
                _store_part(q3, v, y_desc, off_m, off_n + HALF + QUARTER, offs_m, offs_r, r_ok, N, rank, b_ptr,
                            bias_ptr, s_b0, s_bn, s_br, key0, key1, threshold, keep_scale, BRANCHES, HAS_BIAS,
                            DROPOUT, PRECISION)

@triton.jit
def bwd_dx_tma_kernel(dy_ptr, w_ptr, dt_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
                      M, N, K, R, rank, dt_off, s_wn, s_a0, s_a1, s_ak,
                      RP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, PRECISION: tl.constexpr):
    """Persistent dX: for each (BLOCK_M × BLOCK_K) tile, dY W from TMA tiles, + dT A_cat (one more K
    step), TMA store; dA += dTᵀ x from the tile's x, read by TMA (fp32 atomics, lora_A's layout).
    dT at dt_ptr + dt_off."""
    dt_ptr += dt_off
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[s_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    dx_desc = tl.make_tensor_descriptor(dx_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    offs_r = tl.arange(0, RP)
    r_ok = offs_r < R
    n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_k = tile_ids(tile, M, K, BLOCK_M, BLOCK_K, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_k = pid_k * BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for ni in range(n_tiles):
            dyt = dy_desc.load([off_m, ni * BLOCK_N])
            wt = w_desc.load([ni * BLOCK_N, off_k])
            acc = tl.dot(dyt, wt, acc, input_precision=PRECISION)

        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_k = off_k + tl.arange(0, BLOCK_K)
        m_ok, k_ok = offs_m < M, offs_k < K
        rows = offs_m.to(tl.int64)
        dt = tl.load(dt_ptr + rows[:, None] * RP + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        dt = dt.to(dx_desc.dtype)
        xt = x_desc.load([off_m, off_k])
        acc = dx_da_epilogue(acc, dt, a_ptr, xt, rows, offs_k, offs_r, m_ok, k_ok, r_ok, K, rank, s_a0, s_a1, s_ak,
                             None, da_ptr, True, PRECISION)
        dx_desc.store([off_m, off_k], acc.to(dx_desc.dtype))
