"""Multi-head attention core shared by the face backbones.

    attn = softmax(q kᵀ / √d + bias) v

On every backend but ``reference`` this is ``F.scaled_dot_product_attention`` (fused, no
materialised probabilities on CUDA); under ``petal_fast.use_backend("reference")`` it is the
literal formula the released code runs, so the reference model is the unfused baseline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from petal_fast.backend import requested_backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              dropout: float = 0.0) -> torch.Tensor:
    """q, k, v: (..., heads, N, d); ``bias`` broadcastable to (..., heads, N, N), added to the logits."""
    if requested_backend() == "reference":
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        probs = logits.softmax(dim=-1)
        if dropout > 0.0:
            probs = F.dropout(probs, dropout)
        return probs @ v
    if bias is not None:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
