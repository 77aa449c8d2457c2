"""The dropout hash of ``petal_fast.definitions.dropout`` in Triton (tl.uint32 arithmetic, bit-exact).

    mix(x)  = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (mod 2³²)
    seed'   = (seed ^ mix(stream)) & 0x7FFFFFFF                 (mix(0) = 0: stream 0 is the seed)
    key_k   = mix(seed' ^ mix(k + 1))                             (branch k)
    h(i, j) = mix(mix(key ^ i) ^ (j · 0x9E3779B9 mod 2³²)),   keep = (h >> 8) ≥ round(p · 2²⁴)

The PetalLinear kernels compute the keys themselves from the seed tensor and the stream
(``branch_keys``: the seed stays on the device, so a launcher reads no value on the host and traces
into a graph; the host passes ``mix(stream)``, a constant of the layer, as int32 bits);
``host_key`` computes a key on the host for the mask-drawing kernel here.
All arithmetic is on tl.uint32: the multipliers are built as uint32 constants (a Python literal
above 2³¹ could otherwise widen the product), and ``>>`` on unsigned values is a logical shift.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from petal_fast.definitions.dropout import MASK32, keep_threshold, mix32 as host_mix32

SEED_MASK = 0x7FFFFFFF


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
def branch_keys(seed_ptr, stream_mix, DROPOUT: tl.constexpr):
    """(key₀, key₁) as int32 bits of the seed at ``seed_ptr`` (int64, in [0, 2³¹)) in the stream whose
    ``mix(stream)`` is ``stream_mix`` (int32 bits); zeros without dropout (nothing is read)."""
    key0 = tl.full((), 0, tl.int32)
    key1 = tl.full((), 0, tl.int32)
    if DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)
        seed = (seed ^ stream_mix.to(tl.uint32, bitcast=True)) & tl.full((), 0x7FFFFFFF, tl.uint32)  # SEED_MASK
        key0 = mix32(seed ^ mix32(tl.full((), 1, tl.uint32))).to(tl.int32, bitcast=True)
        key1 = mix32(seed ^ mix32(tl.full((), 2, tl.uint32))).to(tl.int32, bitcast=True)
    return key0, key1


def as_int32(value: int) -> int:
    """A uint32 value as the signed int32 with the same bits (one kernel signature for every value)."""
    return value - (1 << 32) if value >= (1 << 31) else value


def stream_mix(stream: int) -> int:
    """mix(stream) as int32 bits, the kernels' ``stream_mix`` argument (``stream`` in [0, 2³¹))."""
    if not 0 <= stream < 2**31:
        raise ValueError(f"stream must be in [0, 2**31), got {stream}")
    return as_int32(host_mix32(stream))


def host_key(seed: int, branch: int, stream: int = 0) -> int:
    """key_branch of (seed, stream) as int32 bits, computed on the host."""
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    seed = (seed ^ host_mix32(stream)) & SEED_MASK
    return as_int32(host_mix32(seed ^ host_mix32(branch + 1)) & MASK32)


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


def dropout_mask(seed: int, branch: int, rows: int, cols: int, p: float, *, stream: int = 0, row_offset: int = 0,
                 device: torch.device | str = "cuda") -> torch.Tensor:
    """The float32 mask the kernels apply (0 or 1/(1−p)) in layer ``stream``; at stream 0 it equals
    ``petal_fast.definitions.dropout.dropout_mask``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    out = torch.empty((rows, cols), dtype=torch.float32, device=device)
    grid = (triton.cdiv(rows, 32), triton.cdiv(cols, 32))
    if rows and cols:
        _mask_kernel[grid](out, rows, cols, row_offset, host_key(seed, branch, stream), host_threshold(p),
                           1.0 / (1.0 - p), BLOCK_R=32, BLOCK_C=32)
    return out
