"""The margin functions the fused margin-softmax path applies to B-long vectors (docs/design.md §1.3).

The fused core (``petal_fast.ops.margin_loss``) reduces the B×C logits to three numbers per row:
the non-target log-sum-exp, the non-target logit sum and the target cosine cos θ_iy. What is left
is B-long and differentiated by autograd; it lives here so that the unsharded op and the
class-sharded head (``petal_fast.nn.margin_loss_sharded``) run one implementation:

    target logit  t_i = s·(cos(m1·θ + m2) − m3)                      cosface / arcface / combined
                  t_i = s·(cos(clip(θ − m·ẑ_i, ε, π−ε)) − m·(1 + ẑ_i))  adaface
    AdaFace ẑ     ẑ_i = clip(h·(‖e_i‖ − μ)/(σ + ε_σ), −1, 1) on detached norms clipped to [0.001, 100]
    per-row loss  lse_i − (1 − ε)·t_i − (ε/C)·zsum_i,  lse_i = logaddexp(lse_nt_i, t_i)

This is production code, written apart from the oracle ``petal_fast.reference.margin_loss`` on purpose:
the tests check both against the textbook formulas, so a slip here cannot be mirrored there.
"""
from __future__ import annotations

import math

import torch

from petal_fast.definitions.margin_loss import (ACOS_EPS, ADAFACE_EPS, ADAFACE_H, ADAFACE_MOMENTUM, ADAFACE_NORM_CLIP,
                                          ADAFACE_STD_EPS, GRADS, REDUCTIONS)

__all__ = ["adaface_update", "adaface_zhat", "combine", "reduce", "smoothed_ce", "target_logit"]


def _clipped_norms(norms: torch.Tensor) -> torch.Tensor:
    lo, hi = ADAFACE_NORM_CLIP
    return norms.detach().clamp(lo, hi)


def adaface_zhat(norms: torch.Tensor, norm_mean: torch.Tensor | float, norm_std: torch.Tensor | float,
                 h: float = ADAFACE_H) -> torch.Tensor:
    """ẑ_i = clip(h·(‖e_i‖ − μ)/(σ + ε_σ), −1, 1): the image-quality proxy of each row (no gradient)."""
    return ((_clipped_norms(norms) - norm_mean) / (norm_std + ADAFACE_STD_EPS) * h).clamp(-1.0, 1.0)


def adaface_update(norms: torch.Tensor, norm_mean: torch.Tensor, norm_std: torch.Tensor,
                   momentum: float = ADAFACE_MOMENTUM) -> tuple[torch.Tensor, torch.Tensor]:
    """New (μ, σ): exponential moving averages of the batch's clipped norms. A one-row batch has no
    standard deviation, so σ is kept."""
    safe = _clipped_norms(norms).to(norm_mean.dtype)
    keep = 1.0 - momentum
    mean = keep * norm_mean + momentum * safe.mean()
    std = keep * norm_std + momentum * safe.std() if safe.numel() > 1 else norm_std.clone()
    return mean, std


def _margined_cosine(cos_t: torch.Tensor, loss: str, margins: tuple[float, ...],
                     zhat: torch.Tensor | None) -> torch.Tensor:
    """f(cos θ) of the target column (without the scale)."""
    if loss == "adaface":
        if zhat is None:
            raise ValueError("loss='adaface' needs zhat (the rows' ẑ from adaface_zhat)")
        (m,) = margins
        # AdaFace clamps both cos (for acos) and the shifted angle, with one ε
        theta = torch.acos(cos_t.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS))
        angle = (theta - m * zhat).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS)
        return torch.cos(angle) - m * (1.0 + zhat)
    m1, m2, m3 = margins
    if m1 == 1.0 and m2 == 0.0:  # additive cosine margin: no acos, exact gradient s at every cos
        return cos_t - m3
    theta = torch.acos(cos_t.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS))  # ±1 would give an infinite dθ/dcos
    return torch.cos(m1 * theta + m2) - m3


def target_logit(cos_t: torch.Tensor, loss: str, margins: tuple[float, ...], scale: float, grad: str = "exact",
                 zhat: torch.Tensor | None = None) -> torch.Tensor:
    """t_i = s·f(cos θ_iy) per row. ``straight_through``: the margined value, the gradient of s·cos θ."""
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    f = _margined_cosine(cos_t, loss, margins, zhat)
    if grad == "straight_through":
        f = cos_t + (f - cos_t).detach()
    return scale * f


def smoothed_ce(lse: torch.Tensor, t: torch.Tensor, zsum: torch.Tensor, num_classes: int,
                label_smoothing: float) -> torch.Tensor:
    """Per-row cross entropy from the row's log-sum-exp, target logit and logit sum:
    lse − (1 − ε)·t − (ε/C)·Σ_j z_j (``F.cross_entropy`` with ``label_smoothing=ε``)."""
    if not label_smoothing:
        return lse - t
    return lse - (1.0 - label_smoothing) * t - (label_smoothing / num_classes) * zsum


def combine(lse_nt: torch.Tensor, zsum_nt: torch.Tensor, t: torch.Tensor, num_classes: int,
            label_smoothing: float) -> torch.Tensor:
    """Per-row loss from the non-target statistics (log-sum-exp, logit sum) and the target logit."""
    return smoothed_ce(torch.logaddexp(lse_nt, t), t, zsum_nt + t, num_classes, label_smoothing)


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``mean`` | ``sum`` | ``none`` over the per-row losses."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
