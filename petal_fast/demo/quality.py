"""BRISQUE scores of the demo's images and the reference quality → α mapping used to report them.

The reference mapping is the one a PETALface run uses (``petal_fast.quality``, oriented, BRISQUE's
default slope k = 0.02) with τ = the median BRISQUE score of the whole adaptation set; each run
calibrates its own τ on its first training batches (reported beside it).
"""
from __future__ import annotations

import numpy as np
import torch

from petal_fast.quality import BrisqueQuality, alpha_from_quality
from petal_fast.quality.brisque import brisque


def brisque_scores(images: np.ndarray, batch: int = 256) -> np.ndarray:
    """(N, H, W, 3) uint8 → (N,) float64 BRISQUE scores (lower = better)."""
    out = [brisque(torch.from_numpy(np.ascontiguousarray(images[s:s + batch])).permute(0, 3, 1, 2)).numpy()
           for s in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros(0)


def reference_alpha(scores: np.ndarray, tau: float) -> np.ndarray:
    """α of each score under the oriented mapping with τ and BRISQUE's default slope."""
    return alpha_from_quality(torch.from_numpy(scores), tau, BrisqueQuality.default_slope,
                              higher_is_better=False).numpy()


def spread(values: np.ndarray) -> dict:
    """Mean, std and the 10/25/50/75/90 % quantiles of finite values."""
    v = values[np.isfinite(values)]
    q = np.quantile(v, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {"mean": float(v.mean()), "std": float(v.std()), **{f"q{int(p * 100)}": float(x)
                                                               for p, x in zip((0.1, 0.25, 0.5, 0.75, 0.9), q)}}
