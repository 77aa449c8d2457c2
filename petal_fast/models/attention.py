"""Multi-head attention core shared by the face backbones.

    attn = softmax(q kᵀ / √d + bias) v

Two implementations, chosen by the model, never by the op backend:

- ``"sdpa"`` (default): ``F.scaled_dot_product_attention`` (fused, no materialised
  probabilities on CUDA);
- ``"math"``: the literal formula the released code runs (logits and probabilities materialised),
  which is what a reference model for tests and benchmarks asks for.

A model's attention modules carry an ``attention_impl`` attribute; :func:`set_attention_impl`
sets it on every one of them (``set_attention_impl(copy.deepcopy(model), "math")`` builds the
unfused baseline).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_IMPLS = ("sdpa", "math")


def check_attention_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return impl


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              dropout: float = 0.0, impl: str = "sdpa") -> torch.Tensor:
    """q, k, v: (..., heads, N, d); ``bias`` broadcastable to (..., heads, N, N), added to the logits."""
    if impl == "math":
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


def set_attention_impl(model: nn.Module, impl: str) -> nn.Module:
    """Make every attention module of ``model`` use ``impl`` (``"sdpa"`` or ``"math"``); returns ``model``."""
    check_attention_impl(impl)
    found = [m for m in model.modules() if hasattr(m, "attention_impl")]
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules (none with an attention_impl)")
    for m in found:
        m.attention_impl = impl
    return model
