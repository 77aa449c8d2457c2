"""BRISQUE's fused stage as a torch composition (the ``torch`` backend of ``petal_fast::fused_brisque``).

Per image of the float64 luminance Y (B, H, W), with w the normalised 7×7 Gaussian (σ = 7/6),
'same' convolution with zero padding:

    μ = w ∗ Y,   σ = sqrt|w ∗ Y² − μ²|,   m = (Y − μ) / (σ + 1/255)          (MSCN)
    maps: m and its horizontal, vertical, main- and secondary-diagonal neighbour products
    sums of each map: Σ|x|, Σ_{x<0} x², n_{x<0}, Σ_{x≥0} x², n_{x≥0}

→ (B, 5 maps, 5 sums), the layout the C++ and Triton kernels produce. float64 throughout: the
local variance ``w ∗ Y² − μ²`` loses most of its digits in flat regions in float32.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .._graph import graph_constant, real_tensors

LUMA = (0.2125, 0.7154, 0.0721)  # skimage.color.rgb2gray
C_MSCN = 1.0 / 255.0
WINDOW, WINDOW_SIGMA = 7, 7.0 / 6.0


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H, W) float64 luminance in [0, 1] (skimage ``rgb2gray`` weights)."""
    x = images.to(torch.float64)
    if images.dtype == torch.uint8:
        x = x / 255.0
    if x.shape[1] == 1:
        return x[:, 0].contiguous()
    w = graph_constant(_luma(x.device))
    return torch.einsum("bchw,c->bhw", x, w).contiguous()


@functools.lru_cache(maxsize=None)
@real_tensors
def _luma(device: torch.device) -> torch.Tensor:
    """The luminance weights on ``device``, made once (a tensor built per call would be a host→device
    copy per batch on a GPU: a synchronisation)."""
    with torch.inference_mode(False):
        return torch.tensor(LUMA, dtype=torch.float64, device=device)


def _window(device: torch.device) -> torch.Tensor:
    r = torch.arange(WINDOW, dtype=torch.float64, device=device) - WINDOW // 2
    k = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * WINDOW_SIGMA ** 2))
    return (k / k.sum())[None, None]


def _sums(x: torch.Tensor) -> torch.Tensor:
    """The five sums of each image's map (first dim) → (B, 5)."""
    x = x.flatten(1)
    neg = x < 0
    sq = x * x
    n_neg = neg.sum(1, dtype=x.dtype)
    return torch.stack([x.abs().sum(1), (sq * neg).sum(1), n_neg, (sq * ~neg).sum(1), x.shape[1] - n_neg], dim=1)


def mscn_moments(gray: torch.Tensor) -> torch.Tensor:
    """(B, H, W) float64 luminance → (B, 5 maps, 5 sums)."""
    w = _window(gray.device)
    # Y and Y² through the window in one convolution (two channels, one shared kernel)
    mu, mu2 = F.conv2d(torch.stack((gray, gray * gray), dim=1).flatten(0, 1)[:, None], w,
                       padding=WINDOW // 2).view(gray.shape[0], 2, *gray.shape[1:]).unbind(1)
    m = (gray - mu) / (torch.sqrt(torch.abs(mu2 - mu * mu)) + C_MSCN)
    maps = (m, m[:, :, :-1] * m[:, :, 1:], m[:, :-1] * m[:, 1:], m[:, :-1, :-1] * m[:, 1:, 1:],
            m[:, 1:, :-1] * m[:, :-1, 1:])
    return torch.stack([_sums(x) for x in maps], dim=1)
