"""Configuration of the PetalLinear Triton kernels, as data: tile ladders, designs, and their selection.

Tiles come from the static table ``TILE_CONFIGS`` keyed by the GPU's compute-capability major (no
autotune stall at the first call). Each kernel has a *ladder* of tiles, largest first; ``choose``
picks one rung per shape (cached by the launchers per device, shape, dtype and flags):

- GEMMs (fwd, fwd_onepass, bwd_dx, bwd_onepass): the rung with the shortest critical path,
  ⌈tiles / SMs⌉ · (BLOCK_M·BLOCK_N + LOAD_COST·(BLOCK_M + BLOCK_N)) (the busiest SM's tiles, each
  costed as its MMA work plus its operand loads), ties to the larger tile; ``programs_per_sm``
  programs share an SM (latency hiding, not more work done). So 8192+ rows keep 128 × 256 tiles and
  the PETALface batch-8 shapes (M = 200..3200) step down to 128 × 128 / 64 × 128 / 64 × 64 tiles
  instead of running 10–117 CTAs of 128 × 256 on 132 SMs.
- Bandwidth passes (shrink, bwd_dy): the largest BLOCK_M that still gives every SM
  ``programs_per_sm`` programs, else the smallest rung; bwd_dy then splits N over programs.

A rung with ``TMA=1`` runs the Hopper kernels of ``petal_linear_tma`` (persistent, TMA descriptors)
for 16-bit inputs whose strides TMA can address; otherwise the pointer kernels with the same tile.
``EPI_SPLIT`` (TMA forward) finishes and stores a tile in that many column slices (dropout hashing
in a slice's registers); ``FLATTEN`` flattens the persistent loop for the pipeliner (off: ptxas
serialises the wgmma pipeline of the flattened loop with the epilogue, C7514/C7515).
``DEFAULT_DESIGN`` holds each generation's design per direction.
``python -m petal_fast.kernels.tune_petal_linear --tune`` measures both on the GPU present, and
``--compile-check 90`` compiles every rung without one; docs/design.md records how the entries were chosen.

The design in force is, in order: the calling thread's innermost ``use_design`` block, the launchers'
``design`` argument (the op passes the design its forward used, or the ``triton_design`` setting:
``kernels/`` imports nothing of petal_fast but ``definitions``), ``DEFAULT_DESIGN``.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch

from petal_fast.definitions.petal_linear import TRITON_DESIGNS as DESIGNS


def _gemm(bm, bn, bk, warps, stages, **extra):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages, **extra)


def _tma(bm, bn, bk, warps, stages, epi=1, pps=1):
    return _gemm(bm, bn, bk, warps, stages, TMA=1, EPI_SPLIT=epi, FLATTEN=0, programs_per_sm=pps)


# Block sizes are for 16-bit inputs: float32 halves the reduction block (same shared-memory
# footprint) and, on the pointer kernels, the BLOCK_M of the big GEMMs (IEEE fp32 dots hold more
# in registers). In bwd_dx / bwd_onepass BLOCK_N is the reduction block and BLOCK_K the output
# column block. A "<kernel>_dropout" ladder replaces the kernel's when p > 0: the mask hashing needs
# registers that a p = 0 tile does not leave. Only the Hopper entries have been compiled for their
# target and (the older entries) timed; Ampere and the default entry have never run: re-tune there.
TILE_CONFIGS: dict[object, dict[str, dict[str, dict[str, int]]]] = {
    9: {  # Hopper: H100 / H200 (228 KB shared memory per SM, 132 SMs)
        "shrink": {"m64": dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=4, programs_per_sm=2),
                   "m32": dict(BLOCK_M=32, BLOCK_K=128, num_warps=4, num_stages=4, programs_per_sm=2),
                   "m16": dict(BLOCK_M=16, BLOCK_K=256, num_warps=4, num_stages=3, programs_per_sm=2)},
        "fwd": {"128x256": _tma(128, 256, 64, 8, 3), "128x128": _tma(128, 128, 64, 8, 4),
                "64x128": _tma(64, 128, 64, 4, 4), "64x64": _tma(64, 64, 64, 4, 4, pps=2)},
        "fwd_dropout": {"128x128": _tma(128, 128, 64, 8, 4, epi=2), "64x128": _tma(64, 128, 64, 4, 4, epi=2),
                        "64x64": _tma(64, 64, 64, 4, 4, pps=2)},
        "bwd_dy": {"m64": dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3, programs_per_sm=2),
                   "m32": dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=3, programs_per_sm=2)},
        "bwd_dx": {"128x128": _tma(128, 64, 128, 8, 4), "64x128": _tma(64, 64, 128, 4, 4),
                   "64x64": _tma(64, 64, 64, 4, 4, pps=2)},
        "fwd_onepass": {"128x256": _tma(128, 256, 64, 8, 3), "128x128": _tma(128, 128, 64, 8, 4),
                        "64x128": _tma(64, 128, 64, 4, 4), "64x64": _tma(64, 64, 64, 4, 4, pps=2)},
        "fwd_onepass_dropout": {"128x128": _tma(128, 128, 64, 8, 4, epi=2),
                                "64x128": _tma(64, 128, 64, 4, 4, epi=2), "64x64": _tma(64, 64, 64, 4, 4, pps=2)},
        "bwd_onepass": {"128x256": _gemm(128, 64, 256, 8, 3)},
    },
    8: {  # Ampere / Ada: A100 (164 KB), RTX 30xx/40xx (100 KB) — sized for the smaller
        "shrink": {"m64": dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3, programs_per_sm=2),
                   "m16": dict(BLOCK_M=16, BLOCK_K=128, num_warps=4, num_stages=3, programs_per_sm=2)},
        "fwd": {"128x128": _gemm(128, 128, 32, 8, 4), "64x64": _gemm(64, 64, 32, 4, 4)},
        "bwd_dy": {"m64": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, programs_per_sm=2)},
        "bwd_dx": {"128x64": _gemm(128, 32, 64, 8, 4), "64x64": _gemm(64, 32, 64, 4, 4)},
        "fwd_onepass": {"128x128": _gemm(128, 128, 32, 8, 3), "64x64": _gemm(64, 64, 32, 4, 4)},
        "bwd_onepass": {"128x128": _gemm(128, 32, 128, 8, 3)},
    },
    "default": {  # other CUDA GPUs: conservative
        "shrink": {"m64": dict(BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=2)},
        "fwd": {"64x64": _gemm(64, 64, 32, 4, 2)},
        "bwd_dy": {"m64": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, programs_per_sm=2)},
        "bwd_dx": {"64x64": _gemm(64, 32, 64, 4, 2)},
        "fwd_onepass": {"64x64": _gemm(64, 64, 32, 4, 2)},
        "bwd_onepass": {"64x64": _gemm(64, 32, 64, 4, 2)},
    },
    # CPU tensors under TRITON_INTERPRET=1: the smallest legal tiles, so that tiny test shapes
    # cover several tiles, the GROUP_M swizzle, masked edges and the N-split of the dY pass.
    "interpreter": {
        "shrink": {"m16": dict(BLOCK_M=16, BLOCK_K=16, num_warps=4, num_stages=1)},
        "fwd": {"16x16": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)},
        "bwd_dy": {"m16": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, programs_per_sm=2)},
        "bwd_dx": {"16x16": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)},
        "fwd_onepass": {"16x16": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)},
        "bwd_onepass": {"16x16": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)},
    },
}
KERNELS = ("shrink", "fwd", "bwd_dy", "bwd_dx", "fwd_onepass", "bwd_onepass")
REDUCTION_BLOCK = {"shrink": "BLOCK_K", "fwd": "BLOCK_K", "bwd_dy": "BLOCK_N", "bwd_dx": "BLOCK_N",
                   "fwd_onepass": "BLOCK_K", "bwd_onepass": "BLOCK_N"}
OUTPUT_BLOCK = {"fwd": "BLOCK_N", "fwd_onepass": "BLOCK_N", "bwd_dx": "BLOCK_K", "bwd_onepass": "BLOCK_K"}
BIG_GEMMS = ("fwd", "bwd_dx", "fwd_onepass", "bwd_onepass")  # fp32 also halves their BLOCK_M (pointer kernels)
TMA_KERNELS = ("fwd", "fwd_onepass", "bwd_dx")               # kernels with a Hopper TMA variant
# choose: a tile's time per K step as MMA work BLOCK_M·BLOCK_N plus LOAD_COST per operand element loaded
# (BLOCK_M + BLOCK_N): a 64 × 64 tile does 58% of a 128 × 256 tile's work per unit time (a forecast;
# the tuner measures).
LOAD_COST = 64
INTERPRETER_SMS = 2  # stands in for the SM count on CPU tensors
MAX_R = 128          # branches·rank: two branches of rank 64

DIRECTIONS = ("fwd", "bwd")
# The kernels each design launches per direction (the tuner adds up their best times).
DESIGN_KERNELS = {("split", "fwd"): ("shrink", "fwd"), ("onepass", "fwd"): ("fwd_onepass",),
                  ("split", "bwd"): ("bwd_dy", "bwd_dx"), ("onepass", "bwd"): ("bwd_onepass",)}
# Each generation's design per direction; only Hopper's is measured (docs/design.md), others: split.
DEFAULT_DESIGN: dict[object, dict[str, str]] = {
    gen: {"fwd": "split", "bwd": "split"} for gen in (8, "default", "interpreter")}
DEFAULT_DESIGN[9] = {"fwd": "onepass", "bwd": "split"}

class _Forced(threading.local):
    """This thread's ``use_design`` blocks, innermost last (a list that always exists: stable guards)."""

    def __init__(self) -> None:
        self.stack: list[str] = []


_forced = _Forced()


@contextlib.contextmanager
def use_design(name: str) -> Iterator[None]:
    """Force the ``"split"`` or ``"onepass"`` kernels for the calls this thread makes inside the block
    (forward and backward: the op keeps the design of a forward for its backward, which autograd may
    run on another thread); for benchmarks, tests and the tuner. Outside any block the launchers'
    ``design`` argument (the ``triton_design`` setting) and then ``DEFAULT_DESIGN`` decide."""
    if name not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {name!r}")
    stack = _forced.stack
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def forced_design() -> str | None:
    """The design of this thread's innermost ``use_design`` block, or None."""
    stack = _forced.stack
    return stack[-1] if stack else None


def design_for(device: torch.device, direction: str, configured: str | None = None) -> str:
    """The design of ``direction`` ("fwd" | "bwd") on ``device``: use_design, then ``configured`` (the
    ``triton_design`` setting, passed down by the op), then ``DEFAULT_DESIGN``."""
    forced = forced_design()
    if forced is not None:
        return forced
    if configured is not None:
        if configured not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS} or None, got {configured!r}")
        return configured
    return DEFAULT_DESIGN[generation(device)][direction]


@functools.cache
def generation(device: torch.device) -> object:
    """The ``TILE_CONFIGS`` / ``DEFAULT_DESIGN`` key of ``device`` (looked up once per device)."""
    if device.type != "cuda":
        return "interpreter"
    major = torch.cuda.get_device_capability(device)[0]
    return major if major in TILE_CONFIGS else "default"


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def ladder(kernel: str, device: torch.device, table: dict | None = None, dropout: bool = False) -> dict:
    """``kernel``'s rungs (name → tiles as written, 16-bit) in ``table`` (default: the device's):
    its ``<kernel>_dropout`` ladder with dropout where the table has one."""
    table = table or TILE_CONFIGS[generation(device)]
    return table.get(f"{kernel}_dropout", table[kernel]) if dropout else table[kernel]


def tiles(cfg: dict[str, int], kernel: str, dtype: torch.dtype | None, tma: bool = False) -> dict[str, int]:
    """A rung for inputs of ``dtype`` (None: as written), a fresh dict: float32 halves the
    reduction block, and on the pointer kernels the BLOCK_M of the big GEMMs."""
    cfg = dict(cfg)
    if dtype is not None and dtype.itemsize == 4:
        halve = (REDUCTION_BLOCK[kernel],) + (("BLOCK_M",) if kernel in BIG_GEMMS and not tma else ())
        for key in halve:
            cfg[key] = max(16, cfg[key] // 2)
    return cfg


def choose(kernel: str, rungs: dict[str, dict[str, int]], M: int, out: int, sms: int) -> dict[str, int]:
    """The rung of ``kernel`` for M rows and ``out`` output columns (N, or K for the dX GEMMs;
    unused by the bandwidth passes) on ``sms`` SMs (rules in the module docstring)."""
    if kernel in OUTPUT_BLOCK:
        def cost(cfg):
            bm, bn = cfg["BLOCK_M"], cfg[OUTPUT_BLOCK[kernel]]
            return -(-(-(-M // bm) * -(-out // bn)) // sms) * (bm * bn + LOAD_COST * (bm + bn))
        return min(rungs.values(), key=cost)  # min keeps the first (larger) rung on ties
    for cfg in rungs.values():
        if -(-M // cfg["BLOCK_M"]) >= sms * cfg.get("programs_per_sm", 1):
            return cfg
    return cfg  # noqa: B007 - the smallest rung


def padded_rank(r_total: int) -> int:
    """RP: branches·rank padded to a power of two ≥ 16, the smallest ``tl.dot`` takes."""
    return max(16, 1 << (r_total - 1).bit_length())
