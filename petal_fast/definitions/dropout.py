"""The counter-based dropout hash that defines PetalLinear's masks D₁, D₂ (docs/design.md §1.1).

A dropout mask is a pure function of (seed, branch, row, column), so the backward pass — and
every backend, the Triton kernels included — regenerates exactly the mask the forward drew,
and no backend ever stores an M×out mask. The hash is Chris Wellons' ``lowbias32`` mixer on
unsigned 32-bit integers:

    mix(x)  = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16   (mod 2³²)
    seed'   = (seed ^ mix(stream)) & 0x7FFFFFFF       (a layer's stream; mix(0) = 0: stream 0 is the seed)
    key     = mix(seed' ^ mix(branch + 1))
    h(i, j) = mix(mix(key ^ i) ^ (j · 0x9E3779B9 mod 2³²))
    keep    = (h >> 8) ≥ round(p · 2²⁴)          (24-bit uniform, exact in float32)

and a kept element is scaled by 1 / (1 − p). ``seed`` is in [0, 2³¹), ``i`` the flattened row,
``j`` the output column. ``stream`` (in [0, 2³¹)) tells layers apart that share one seed: a forward pass
draws one seed on the device and every PetalLinear hashes it with its own stream, so no per-layer seed
has to be drawn (a launch) or copied from the host (a synchronisation). This file holds the definition (torch, int64 arithmetic masked to 32
bits); ``csrc/hash32.h`` (uint32_t) and ``kernels/_rng.py`` (tl.uint32) implement the same bits,
and the tests compare their masks with :func:`dropout_mask`.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MUL1, MUL2, GOLDEN = 0x7FEB352D, 0x846CA68B, 0x9E3779B9
UNIFORM_BITS = 24  # the kept-or-dropped test compares the hash's top 24 bits with the threshold


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """lowbias32 on values held in int64 (or Python ints), result in [0, 2³²)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MUL2) & MASK32
    return x ^ (x >> 16)


SEED_MASK = 0x7FFFFFFF


def stream_seed(seed: int | torch.Tensor, stream: int) -> int | torch.Tensor:
    """seed' = (seed ^ mix(stream)) & 0x7FFFFFFF: the seed of layer ``stream`` (stream 0: ``seed`` itself)."""
    if not 0 <= stream < 2**31:
        raise ValueError(f"stream must be in [0, 2**31), got {stream}")
    if isinstance(seed, torch.Tensor):
        return (seed.reshape(1).to(torch.int64) ^ mix32(stream)) & SEED_MASK
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    return (seed ^ mix32(stream)) & SEED_MASK


def branch_key(seed: int | torch.Tensor, branch: int, stream: int = 0) -> int | torch.Tensor:
    """key = mix(seed' ^ mix(branch + 1)), a uint32 held in a Python int — or, for a 1-element integer
    tensor seed (what a traced graph holds: its value is not read on the host), in an int64 tensor."""
    return mix32(stream_seed(seed, stream) ^ mix32(branch + 1))


def keep_threshold(p: float) -> int:
    """Integer threshold t: an element is kept when its 24-bit uniform is ≥ t."""
    return int(round(p * (1 << UNIFORM_BITS)))


def dropout_mask(seed: int | torch.Tensor, branch: int, rows: int, cols: int, p: float, *,
                 stream: int = 0, row_offset: int = 0, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """The (rows × cols) dropout mask of ``branch`` for ``seed``: 0 where dropped, 1/(1−p) where kept.

    ``row_offset`` selects rows ``row_offset … row_offset+rows−1`` of the flattened input, so a
    caller can draw the mask of a row block without drawing the whole matrix.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    key = branch_key(seed, branch, stream)
    if isinstance(key, torch.Tensor):
        key = key.to(device)
    i = torch.arange(row_offset, row_offset + rows, dtype=torch.int64, device=device)
    j = torch.arange(cols, dtype=torch.int64, device=device)
    row_hash = mix32(i ^ key)
    col_term = (j * GOLDEN) & MASK32
    h = mix32(row_hash[:, None] ^ col_term[None, :])
    keep = (h >> (32 - UNIFORM_BITS)) >= keep_threshold(p)
    return keep.to(dtype) * (1.0 / (1.0 - p))
