"""Batched BRISQUE (Mittal et al. 2012) on the device, equal to the ``brisque`` PyPI package.

    score = SVR(scale([f(Y), f(resize_half(Y))])),   lower = better quality (typically 0 … 100)

The computation is the op ``petal_fast.ops.brisque`` (luminance; the fused MSCN-moment stage, C++
on CPU, Triton on CUDA; AGGD fits; the same at OpenCV's half-size bicubic resize; the trained RBF
ε-SVR from the installed ``brisque`` distribution), float64 after the luminance: BRISQUE's local
variance ``E[Y²] − μ²`` loses most of its digits in flat regions in float32.

Input contract: ``(B, C, H, W)``, C = 1 (gray) or 3 (RGB), H, W ≥ 16, uint8 (0 … 255) or float in
[0, 1]. Float tensors outside [0, 1] are rejected — the released PETALface code fed [−1, 1]
images to its IQA; convert with ``(x + 1) / 2`` first.

Degenerate images: BRISQUE fits distributions to the local contrast of an image; a constant (blank,
black) or otherwise flat image has none, its features are undefined (0/0) and the SVR returns NaN
(the ``brisque`` package too). :func:`brisque` scores such an image ``+inf`` — worse than any real
image, so the quality → α mapping gives it α = 0 (all weight on the low-quality branch) — and warns
once per call with the number of such images (:class:`DegenerateImageWarning`). Their rows of
:func:`brisque_features` stay NaN: the features do not exist.
"""
from __future__ import annotations

import torch

from petal_fast.ops.brisque import (DEGENERATE_SCORE, MIN_SIZE, DegenerateImageWarning,  # noqa: F401
                                    brisque_op, check_images)

__all__ = ["DEGENERATE_SCORE", "DegenerateImageWarning", "brisque", "brisque_features", "check_images"]


@torch.no_grad()
def brisque_features(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, 36) float64 BRISQUE features, in the package's order."""
    return brisque_op(images, features=True)


@torch.no_grad()
def brisque(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 or float in [0, 1] → (B,) float64 BRISQUE scores (lower = better), on
    ``images.device``; equal to ``brisque.BRISQUE().score`` of each image. Not differentiable."""
    return brisque_op(images, features=False)
