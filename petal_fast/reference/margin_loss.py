"""Margin-softmax losses, materialised insightface-style: the test oracle and the benchmarks' baseline.

docs/design.md §1.3. Only the target logit of a normalised-cosine softmax changes:

    cos θ_ij = ⟨e_i/‖e_i‖, w_j/‖w_j‖⟩,   logit_ij = s·cos θ_ij  (j ≠ y_i)
    combined:  logit_iy = s·(cos(m1·θ_iy + m2) − m3)   CosFace (1, 0, 0.4), ArcFace (1, 0.5, 0)
    AdaFace:   logit_iy = s·(cos(clip(θ_iy − m·ẑ_i, ε, π−ε)) − m·(1 + ẑ_i)),
               ẑ_i = clip(h·(‖e_i‖ − μ)/(σ + 1e−3), −1, 1) on detached norms
    loss_i = cross_entropy(logit_i, y_i, label_smoothing)

Gradient conventions at the target: ``exact`` differentiates the margin function;
``straight_through`` applies the margin without gradient (d logit_iy / d cos θ_iy = s, as
insightface arcface_torch). θ comes from a clamped cosine so cos = ±1 never gives NaN, and norms
are ε-safe (``F.normalize``), so a zero embedding gives a finite loss.

Imports only torch and the shared names and constants (``petal_fast.definitions.margin_loss``);
every function works in float64. The fused path has its own implementation
(``petal_fast.ops.margin_loss.per_row``): nothing here is called by production code but the ``reference``
backend of the op dispatcher.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from petal_fast.definitions.margin_loss import (ACOS_EPS, ADAFACE_EPS, ADAFACE_H, ADAFACE_MOMENTUM, DEFAULT_MARGINS,
                                          GRADS, LOSSES, NORM_EPS, REDUCTIONS, resolve_margins)

__all__ = ["ACOS_EPS", "ADAFACE_EPS", "ADAFACE_H", "ADAFACE_MOMENTUM", "DEFAULT_MARGINS", "GRADS", "LOSSES",
           "NORM_EPS", "REDUCTIONS", "adaface_update", "adaface_zhat", "margin_loss", "reduce",
           "resolve_margins", "smoothed_ce", "target_logit"]


def adaface_zhat(norms: torch.Tensor, norm_mean: torch.Tensor | float, norm_std: torch.Tensor | float,
                 h: float = ADAFACE_H) -> torch.Tensor:
    """ẑ = clip(h·(‖e‖ − μ)/(σ + 1e−3), −1, 1) on detached, clipped (0.001…100) norms."""
    safe = norms.detach().clamp(0.001, 100.0)
    return ((safe - norm_mean) / (norm_std + 1e-3) * h).clamp(-1.0, 1.0)


def adaface_update(norms: torch.Tensor, norm_mean: torch.Tensor, norm_std: torch.Tensor,
                   momentum: float = ADAFACE_MOMENTUM) -> tuple[torch.Tensor, torch.Tensor]:
    """New (μ, σ): moving averages of the batch's detached norms (σ kept when the batch has one row)."""
    safe = norms.detach().clamp(0.001, 100.0).to(norm_mean.dtype)
    mean = (1.0 - momentum) * norm_mean + momentum * safe.mean()
    std = (1.0 - momentum) * norm_std + momentum * safe.std() if safe.numel() > 1 else norm_std.clone()
    return mean, std


def target_logit(cos_t: torch.Tensor, loss: str, margins: tuple[float, ...], scale: float, grad: str = "exact",
                 zhat: torch.Tensor | None = None) -> torch.Tensor:
    """s·f(cos θ_iy) for each row (B-long); ``straight_through`` keeps d/dcos = s."""
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    if loss == "adaface":
        (m,) = margins
        theta = torch.acos(cos_t.clamp(-1.0 + ADAFACE_EPS, 1.0 - ADAFACE_EPS))
        theta_m = (theta - m * zhat).clamp(ADAFACE_EPS, math.pi - ADAFACE_EPS)
        f = torch.cos(theta_m) - m * (1.0 + zhat)
    else:
        m1, m2, m3 = margins
        if m1 == 1.0 and m2 == 0.0:
            f = cos_t - m3
        else:
            theta = torch.acos(cos_t.clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS))
            f = torch.cos(m1 * theta + m2) - m3
    if grad == "straight_through":
        f = cos_t + (f - cos_t).detach()
    return scale * f


def smoothed_ce(lse: torch.Tensor, t: torch.Tensor, zsum: torch.Tensor, num_classes: int,
                label_smoothing: float) -> torch.Tensor:
    """Per-row cross entropy from the row's log-sum-exp, target logit and logit sum:
    lse − (1 − ε)·t − (ε/C)·Σ_j z_j  (``F.cross_entropy`` with ``label_smoothing=ε``)."""
    loss = lse - t
    if label_smoothing:
        loss = lse - (1.0 - label_smoothing) * t - (label_smoothing / num_classes) * zsum
    return loss


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def margin_loss(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        loss: str = "cosface", margins: tuple[float, ...] | None = None, scale: float = 64.0,
                        grad: str = "exact", label_smoothing: float = 0.0, reduction: str = "mean",
                        norm_mean: torch.Tensor | float = 20.0, norm_std: torch.Tensor | float = 100.0,
                        h: float = ADAFACE_H) -> torch.Tensor:
    """Materialised margin softmax: normalise, linear (B×C cosines), margin on the target column,
    cross entropy. For AdaFace, ``norm_mean``/``norm_std`` are the (already updated) μ, σ."""
    margins = resolve_margins(loss, margins)
    en = F.normalize(embeddings, dim=1, eps=NORM_EPS)
    wn = F.normalize(weight, dim=1, eps=NORM_EPS)
    cos = en @ wn.t()
    idx = labels.long().unsqueeze(1)
    cos_t = cos.gather(1, idx).squeeze(1)
    zhat = adaface_zhat(embeddings.norm(dim=1), norm_mean, norm_std, h) if loss == "adaface" else None
    t = target_logit(cos_t, loss, margins, scale, grad, zhat)
    logits = (scale * cos).scatter(1, idx, t.unsqueeze(1).to(cos.dtype))
    return F.cross_entropy(logits, labels.long(), label_smoothing=label_smoothing, reduction=reduction)
