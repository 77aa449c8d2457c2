"""MarginSoftmaxLoss: the margin-softmax head (CosFace, ArcFace, combined, AdaFace), fused.

Owns the class centres ``weight`` (C×D) and, for AdaFace, the moving averages μ (``norm_mean``)
and σ (``norm_std``) of the embedding norms (both from :class:`~petal_fast.nn.margin_head.MarginHead`).
``forward(embeddings, labels)`` returns the mean loss (``reduction="none"``: per-row losses)
through ``petal_fast.ops.margin_loss``, which never materialises the B×C logits (docs/design.md §1.3).
"""
from __future__ import annotations

import torch

from petal_fast.definitions.margin import ADAFACE_H, ADAFACE_INIT, ADAFACE_MOMENTUM
from petal_fast.ops.margin_loss import check_reduction, check_tensors, margin_softmax_loss_unchecked

from .margin_head import MarginHead


class MarginSoftmaxLoss(MarginHead):
    """Margin-softmax classification head.

    loss: ``cosface`` (m3 = 0.4), ``arcface`` (m2 = 0.5), ``combined`` (``margins=(m1, m2, m3)``:
    s·(cos(m1·θ + m2) − m3)), ``adaface`` (``margins=(m,)``, m = 0.4, h = 0.333).
    grad: ``exact`` (true derivative of the margin) or ``straight_through`` (margin without
    gradient, as insightface arcface_torch). sample_rate < 1: Partial FC negative sampling, every
    positive plus uniform negatives, min(C, max(⌈sample_rate·C⌉, B)) classes per call
    (``petal_fast.ops.margin_loss.partial_fc_sample``; compiles with ``fullgraph=True``).
    """

    def __init__(self, embedding_dim: int, num_classes: int, loss: str = "cosface",
                 margins: tuple[float, ...] | None = None, scale: float = 64.0, grad: str = "exact",
                 label_smoothing: float = 0.0, sample_rate: float = 1.0, h: float = ADAFACE_H,
                 momentum: float = ADAFACE_MOMENTUM, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(embedding_dim, num_classes, None, loss, margins, scale, grad, label_smoothing, sample_rate,
                         h, momentum, device, dtype)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        # the op's checks, once: the tensors every call, of the settings only the per-call reduction
        check_tensors(embeddings, self.weight, labels)
        check_reduction(reduction)
        stats = self.adaface_stats(embeddings.detach().float().norm(dim=1)) if self.loss == "adaface" else None
        mean, std = stats if stats is not None else ADAFACE_INIT
        out = margin_softmax_loss_unchecked(embeddings, self.weight, labels, self.loss, self.margins, self.scale,
                                            self.grad, self.label_smoothing, reduction, mean, std, self.h,
                                            self.sample_rate)
        self.commit_adaface(stats)
        return out
