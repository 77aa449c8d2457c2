"""PetalLinear, literally (docs/design.md §1.1) — the test oracle and the benchmarks' "reference".

    y = x Wᵀ + b + s·(1 − α_i)·D₁(x A_lrᵀ B_lrᵀ) + s·α_i·D₂(x A_hrᵀ B_hrᵀ)

Rows of x (flattened to M) belong to images image-major: ``i = row // (M / len(α))``. With one
branch (plain LoRA) the branch weight is s and α is not used. Written for clarity, not speed:
α is repeated per row and every branch product is materialised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rng import dropout_mask


def branch_weights(alpha: torch.Tensor | None, rows: int, branches: int, scale: float,
                   dtype: torch.dtype) -> list[torch.Tensor | float]:
    """Per-row weight of each branch: [s·(1−α_i), s·α_i] for two branches, [s] for one."""
    if branches == 1:
        return [scale]
    a = alpha.to(dtype).repeat_interleave(rows // max(alpha.numel(), 1))[:, None]
    return [scale * (1.0 - a), scale * a]


def petal_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: torch.Tensor | None,
                 scale: float, dropout: float = 0.0, seed: int = 0, stream: int = 0) -> torch.Tensor:
    """``lora_A``: (branches, r, in); ``lora_B``: (branches, out, r); ``alpha``: (images,) or None;
    ``seed``, ``stream``: the dropout masks' hash inputs (petal_fast.definitions.dropout)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    rows, branches = x2.shape[0], lora_A.shape[0]
    y = F.linear(x2, weight, bias)
    for b, c in enumerate(branch_weights(alpha, rows, branches, scale, x2.dtype)):
        p = (x2 @ lora_A[b].T) @ lora_B[b].T
        if dropout > 0.0:
            p = p * dropout_mask(seed, b, rows, p.shape[1], dropout, stream=stream, dtype=p.dtype, device=p.device)
        y = y + c * p
    return y.reshape(*lead, weight.shape[0])


def released_petal_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: torch.Tensor,
                          scale: float, dropout: float = 0.0, training: bool = True) -> torch.Tensor:
    """The released PETALface code's eager form, used as the benchmarks' baseline:

        F.linear(x, W, b) + s·D(B_lr(A_lr((1−α)·x))) + s·D(B_hr(A_hr(α·x)))

    with α repeated to one value per row, the input scaled (M×in passes) and ``nn.Dropout`` masks.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    a = alpha.to(x2.dtype).repeat_interleave(x2.shape[0] // alpha.numel())[:, None]
    y = F.linear(x2, weight, bias)
    for b, xs in enumerate(((1.0 - a) * x2, a * x2)):
        p = F.linear(F.linear(xs, lora_A[b]), lora_B[b])
        y = y + scale * F.dropout(p, dropout, training)
    return y.reshape(*lead, weight.shape[0])
