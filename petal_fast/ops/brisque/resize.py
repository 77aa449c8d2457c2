"""OpenCV-compatible half-size bicubic resize: ``cv2.resize(y, None, fx=0.5, fy=0.5, INTER_CUBIC)``.

With fx = 1/2 OpenCV maps output j to input ``2j + 1/2`` (scale = 1/fx, half-pixel centres), so
every output is the same 4-tap filter at fractional offset 1/2 of its cubic kernel (a = −0.75):

    out[j] = −3/32 · x[2j−1] + 19/32 · x[2j] + 19/32 · x[2j+1] − 3/32 · x[2j+2]

with indices clamped to the image (OpenCV replicates the border for INTER_CUBIC), separably over
rows then columns. The output size is ``saturate_cast<int>(n · 0.5)``: round half to even
(17 → 8, 23 → 12).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._graph import graph_constant, real_tensors

HALF_CUBIC = (-3.0 / 32.0, 19.0 / 32.0, 19.0 / 32.0, -3.0 / 32.0)


def half_size(n: int) -> int:
    return round(n / 2)  # Python rounds half to even, as cvRound does


def _half_last(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    out = half_size(n)
    # taps 2j−1 … 2j+2 for j < out: one replicated sample on the left, up to index 2·out on the right
    x = F.pad(x, (1, 2 * out + 1 - n), mode="replicate")
    w = graph_constant(_taps(x.dtype, x.device))
    return x.unfold(-1, 4, 2) @ w


@functools.lru_cache(maxsize=None)
@real_tensors
def _taps(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 4 taps on ``device``, made once (not a host→device copy per batch)."""
    with torch.inference_mode(False):
        return torch.tensor(HALF_CUBIC, dtype=dtype, device=device)


def resize_half(gray: torch.Tensor) -> torch.Tensor:
    """(B, H, W) → (B, round(H/2), round(W/2))."""
    return _half_last(_half_last(gray).transpose(1, 2)).transpose(1, 2)
