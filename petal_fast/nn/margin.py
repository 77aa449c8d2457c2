"""MarginSoftmaxLoss: the margin-softmax head (CosFace, ArcFace, combined, AdaFace), fused.

Owns the class centres ``weight`` (C×D) and, for AdaFace, the moving averages μ (``norm_mean``)
and σ (``norm_std``) of the embedding norms. ``forward(embeddings, labels)`` returns the mean loss
(``reduction="none"``: per-row losses) through ``petal_fast.ops.margin_loss``, which never
materialises the B×C logits (docs/design.md §1.3).
"""
from __future__ import annotations

import torch
from torch import nn

from petal_fast.definitions.margin import ADAFACE_H, ADAFACE_INIT, ADAFACE_MOMENTUM, GRADS, resolve_margins
from petal_fast.margin_math import adaface_update
from petal_fast.ops.margin_loss import check_inputs, margin_softmax_loss


class MarginSoftmaxLoss(nn.Module):
    """Margin-softmax classification head.

    loss: ``cosface`` (m3 = 0.4), ``arcface`` (m2 = 0.5), ``combined`` (``margins=(m1, m2, m3)``:
    s·(cos(m1·θ + m2) − m3)), ``adaface`` (``margins=(m,)``, m = 0.4, h = 0.333).
    grad: ``exact`` (true derivative of the margin) or ``straight_through`` (margin without
    gradient, as insightface arcface_torch). sample_rate < 1: Partial FC negative sampling.
    """

    def __init__(self, embedding_dim: int, num_classes: int, loss: str = "cosface",
                 margins: tuple[float, ...] | None = None, scale: float = 64.0, grad: str = "exact",
                 label_smoothing: float = 0.0, sample_rate: float = 1.0, h: float = ADAFACE_H,
                 momentum: float = ADAFACE_MOMENTUM, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be an integer >= 1, got {embedding_dim!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if grad not in GRADS:
            raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.loss, self.margins = loss, resolve_margins(loss, margins)
        self.scale, self.grad, self.label_smoothing = float(scale), grad, float(label_smoothing)
        self.sample_rate, self.h, self.momentum = float(sample_rate), float(h), float(momentum)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.01)  # as insightface Partial FC
        if loss == "adaface":
            self.register_buffer("norm_mean", torch.tensor(ADAFACE_INIT[0], device=device))
            self.register_buffer("norm_std", torch.tensor(ADAFACE_INIT[1], device=device))

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, loss={self.loss!r}, "
                f"margins={self.margins}, scale={self.scale}, grad={self.grad!r}, "
                f"label_smoothing={self.label_smoothing}, sample_rate={self.sample_rate}")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        check_inputs(embeddings, self.weight, labels, self.scale, self.label_smoothing, self.sample_rate, self.grad,
                     reduction=reduction)
        mean = std = None
        if self.loss == "adaface":
            mean, std = self.norm_mean, self.norm_std
            if self.training:  # updated before use; committed only once the loss is computed
                mean, std = adaface_update(embeddings.detach().float().norm(dim=1), mean, std, self.momentum)
        out = margin_softmax_loss(embeddings, self.weight, labels, self.loss, self.margins, self.scale, self.grad,
                                  self.label_smoothing, reduction, mean if mean is not None else ADAFACE_INIT[0],
                                  std if std is not None else ADAFACE_INIT[1], self.h, self.sample_rate)
        if self.loss == "adaface" and self.training:
            self.norm_mean.copy_(mean)
            self.norm_std.copy_(std)
        return out
