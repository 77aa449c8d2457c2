"""Margin-softmax loss names, default margins and the constants of the formulas (docs/design.md §1.3).

Shared by the fused path (``petal_fast.ops.margin_loss.per_row``, ``petal_fast.ops.margin_loss``), the modules
and the oracle (``petal_fast.reference.margin_loss``); the formulas themselves are written separately
in each. :func:`resolve_margins` is the one parser of the ``margins`` argument.
"""
from __future__ import annotations

import math

LOSSES = ("cosface", "arcface", "combined", "adaface")
GRADS = ("exact", "straight_through")
REDUCTIONS = ("mean", "sum", "none")
# (m1, m2, m3) of s·(cos(m1·θ + m2) − m3) as insightface; AdaFace's m as the AdaFace paper
DEFAULT_MARGINS = {"cosface": (1.0, 0.0, 0.4), "arcface": (1.0, 0.5, 0.0), "adaface": (0.4,)}
NORM_EPS = 1e-12      # ε of the ε-safe norms, as F.normalize
ACOS_EPS = 1e-6       # cos clamped to [−1+ε, 1−ε] before acos (combined margins)
ADAFACE_EPS = 1e-3    # AdaFace's clamp of cos and clip of θ (as the AdaFace code)
ADAFACE_H = 0.333     # h of ẑ = clip(h·(‖e‖ − μ)/(σ + ε), −1, 1)
ADAFACE_MOMENTUM = 0.01
ADAFACE_STD_EPS = 1e-3          # the ε in σ + ε
ADAFACE_NORM_CLIP = (0.001, 100.0)  # norms are clipped before they enter ẑ or the moving averages
ADAFACE_INIT = (20.0, 100.0)    # μ, σ before the first batch (as the AdaFace code)


def resolve_margins(loss: str, margins: tuple[float, ...] | None) -> tuple[float, ...]:
    """(m1, m2, m3) for cosface/arcface/combined, (m,) for adaface; defaults as insightface / AdaFace."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if margins is None:
        if loss == "combined":
            raise ValueError("margins=(m1, m2, m3) is required for loss='combined'")
        return DEFAULT_MARGINS[loss]
    margins = tuple(float(m) for m in margins)
    want = 1 if loss == "adaface" else 3
    if len(margins) != want:
        raise ValueError(f"margins for loss={loss!r} must have {want} value(s), got {margins}")
    if not all(math.isfinite(m) for m in margins):
        raise ValueError(f"margins must be finite, got {margins}")
    return margins
