"""The dropout hash of ``petal_fast.definitions.dropout`` in Triton (tl.uint32 arithmetic, bit-exact).

    mix(x)  = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (mod 2³²)
    h(i, j) = mix(mix(key ^ i) ^ (j · 0x9E3779B9 mod 2³²)),   keep = (h >> 8) ≥ round(p · 2²⁴)

``key = mix(seed ^ mix(branch + 1))``: the PetalLinear kernels compute it themselves from the seed
tensor (``branch_keys``: the seed stays on the device, so a launcher reads no value on the host and
traces into a graph); ``host_key`` computes it on the host for the mask-drawing kernel here.
All arithmetic is on tl.uint32: the multipliers are built as uint32 constants (a Python literal
above 2³¹ could otherwise widen the product), and ``>>`` on unsigned values is a logical shift.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from petal_fast.definitions.dropout import branch_key, keep_threshold


@triton.jit
def mix32(x):
    """lowbias32 on a tl.uint32 block."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def keep_mask(key, rows, cols, threshold):
    """(len(rows) × len(cols)) boolean keep mask for global row / column indices.

    ``key``: int32 scalar holding the uint32 branch key's bits; ``threshold``: int32 scalar.
    """
    k = key.to(tl.uint32, bitcast=True)
    row_hash = mix32(rows.to(tl.uint32) ^ k)
    col_term = cols.to(tl.uint32) * tl.full((), 0x9E3779B9, tl.uint32)
    h = mix32(row_hash[:, None] ^ col_term[None, :])
    return (h >> 8) >= threshold.to(tl.uint32)


@triton.jit
def branch_keys(seed_ptr, DROPOUT: tl.constexpr):
    """(key₀, key₁) of the seed at ``seed_ptr`` (int64, in [0, 2³¹)) as int32 bits; zeros without dropout."""
    key0 = tl.full((), 0, tl.int32)
    key1 = tl.full((), 0, tl.int32)
    if DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)
        key0 = mix32(seed ^ mix32(tl.full((), 1, tl.uint32))).to(tl.int32, bitcast=True)
        key1 = mix32(seed ^ mix32(tl.full((), 2, tl.uint32))).to(tl.int32, bitcast=True)
    return key0, key1


def host_key(seed: int, branch: int) -> int:
    """The branch key as a signed int32 with the bits of the uint32 key (one kernel signature)."""
    key = branch_key(seed, branch)
    return key - (1 << 32) if key >= (1 << 31) else key


def host_threshold(p: float) -> int:
    return keep_threshold(p)


@triton.jit
def _mask_kernel(out_ptr, rows, cols, row_offset, key, threshold, keep_scale,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    keep = keep_mask(key, offs_r + row_offset, offs_c, threshold)
    val = tl.where(keep, keep_scale, 0.0)
    ok = (offs_r < rows)[:, None] & (offs_c < cols)[None, :]
    tl.store(out_ptr + offs_r[:, None] * cols + offs_c[None, :], val, mask=ok)


def dropout_mask(seed: int, branch: int, rows: int, cols: int, p: float, *, row_offset: int = 0,
                 device: torch.device | str = "cuda") -> torch.Tensor:
    """The float32 mask the kernels apply (0 or 1/(1−p)); equals ``petal_fast.definitions.dropout.dropout_mask``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    out = torch.empty((rows, cols), dtype=torch.float32, device=device)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
    if rows and cols:
        _mask_kernel[grid](out, rows, cols, row_offset, host_key(seed, branch), host_threshold(p),
                           1.0 / (1.0 - p), BLOCK_R=32, BLOCK_C=32)
    return out
