"""Configuration of the PetalLinear Triton kernels, as data: tile tables, designs, and their selection.

Tiles come from the static table ``TILE_CONFIGS`` keyed by the GPU's compute-capability major (no
autotune stall at the first call); ``DEFAULT_DESIGN`` holds each generation's design per direction.
``python -m petal_fast.kernels.tune_petal_linear --tune`` measures both on the GPU present and prints
the entries to paste here; docs/design.md records how the current entries were chosen.

The design in force is, in order: the innermost ``use_design`` block, the configured design,
``DEFAULT_DESIGN``. The configured design is ``petal_fast.settings``' ``triton_design``
(``PETAL_FAST_TRITON_DESIGN``, read once with every other setting), which that module hands down through
``configure_design``: ``kernels/`` may not import the layers above it, and reads no environment itself.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

# Block sizes are for 16-bit inputs: float32 halves the reduction block (same shared-memory
# footprint) and the BLOCK_M of the big GEMMs (IEEE fp32 dots hold more in registers).
# "programs_per_sm" sets the target grid of the dY pass, as a multiple of the SM count (N is split
# over programs when M alone gives too few). A "<kernel>_dropout" entry replaces the kernel's tile
# when p > 0: the mask hashing needs registers that a larger p = 0 tile does not leave.
# Only the Hopper entry has been timed; Ampere and the default entry have never run: re-tune there.
TILE_CONFIGS: dict[object, dict[str, dict[str, int]]] = {
    9: {  # Hopper: H100 / H200 (228 KB shared memory per SM)
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

DESIGNS = ("split", "onepass")
DIRECTIONS = ("fwd", "bwd")
# The kernels each design launches per direction (the tuner adds up their best times).
DESIGN_KERNELS = {("split", "fwd"): ("shrink", "fwd"), ("onepass", "fwd"): ("fwd_onepass",),
                  ("split", "bwd"): ("bwd_dy", "bwd_dx"), ("onepass", "bwd"): ("bwd_onepass",)}
# Each generation's design per direction; only Hopper's is measured (docs/design.md), others: split.
DEFAULT_DESIGN: dict[object, dict[str, str]] = {
    gen: {"fwd": "split", "bwd": "split"} for gen in (8, "default", "interpreter")}
DEFAULT_DESIGN[9] = {"fwd": "onepass", "bwd": "split"}

_configured: str | None = None  # petal_fast.settings' triton_design; None: DEFAULT_DESIGN decides
_design_override: list[str] = []  # process-wide, not thread-local: backward runs on autograd's threads


def configure_design(name: str | None) -> None:
    """Set the design outside ``use_design`` blocks (None: ``DEFAULT_DESIGN``). Called by
    ``petal_fast.settings`` (``configure(triton_design=...)``), the one owner of this setting."""
    global _configured
    if name is not None and name not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS} or None, got {name!r}")
    _configured = name


def configured_design() -> str | None:
    """The design set by ``configure_design`` (None: ``DEFAULT_DESIGN`` decides)."""
    return _configured


@contextlib.contextmanager
def use_design(name: str) -> Iterator[None]:
    """Force the ``"split"`` or ``"onepass"`` kernels inside the block (forward and backward).

    Process-wide (backward may run on another thread); for benchmarks and tests. Outside any
    block the configured design (``petal_fast.settings``) and then ``DEFAULT_DESIGN`` decide.
    """
    if name not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {name!r}")
    _design_override.append(name)
    try:
        yield
    finally:
        _design_override.pop()


def design_for(device: torch.device, direction: str) -> str:
    """The design of ``direction`` ("fwd" | "bwd") on ``device``: use_design, then the configured
    design, then ``DEFAULT_DESIGN``."""
    if _design_override:
        return _design_override[-1]
    if _configured is not None:
        return _configured
    return DEFAULT_DESIGN[generation(device)][direction]


def generation(device: torch.device) -> object:
    """The ``TILE_CONFIGS`` / ``DEFAULT_DESIGN`` key of ``device``."""
    if device.type != "cuda":
        return "interpreter"
    major = torch.cuda.get_device_capability(device)[0]
    return major if major in TILE_CONFIGS else "default"


def config_for(kernel: str, device: torch.device, dtype: torch.dtype,
               table: dict | None = None, dropout: bool = False) -> dict[str, int]:
    """The tile configuration of ``kernel`` on ``device`` for inputs of ``dtype`` (a fresh dict):
    the table's ``<kernel>_dropout`` entry with dropout where it has one; float32 tiles derived
    on CUDA (the interpreter's tiles are already the smallest)."""
    table = table or TILE_CONFIGS[generation(device)]
    return tiles(table, kernel, dtype if device.type == "cuda" else None, dropout)


def tiles(table: dict, kernel: str, dtype: torch.dtype | None, dropout: bool) -> dict[str, int]:
    """``kernel``'s entry of ``table`` (its dropout entry if asked and present), for ``dtype``
    (None: as written)."""
    cfg = dict(table.get(f"{kernel}_dropout", table[kernel]) if dropout else table[kernel])
    if dtype is not None and dtype.itemsize == 4:
        halve = (REDUCTION_BLOCK[kernel], "BLOCK_M") if kernel in BIG_GEMMS else (REDUCTION_BLOCK[kernel],)
        for key in halve:
            cfg[key] = max(16, cfg[key] // 2)
    return cfg


def padded_rank(r_total: int) -> int:
    """RP: branches·rank padded to a power of two ≥ 16, the smallest ``tl.dot`` takes."""
    return max(16, 1 << (r_total - 1).bit_length())


@functools.cache
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count
