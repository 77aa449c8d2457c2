"""The margin-loss heads' modules: :class:`MarginSoftmaxLoss` (all classes on one process) and
:class:`MarginLossHead`, what it shares with ``ShardedMarginSoftmaxLoss`` (``nn/margin_loss_sharded.py``).

A head owns the class centres ``weight`` (C×D) and, for AdaFace, the moving averages of the embedding
norms, μ (``norm_mean``) and σ (``norm_std``):

    μ ← (1 − momentum)·μ + momentum·mean(‖e‖),   σ ← (1 − momentum)·σ + momentum·std(‖e‖)

updated from the batch before the loss uses them (training mode only), and written into the buffers
only once the loss has been computed, so a step that raises leaves them untouched. Settings are
checked once, at construction; the per-call tensors by the op (``petal_fast.ops.margin_loss``), which
never materialises the B×C logits (docs/design.md §1.3).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from petal_fast.definitions.margin_loss import ADAFACE_H, ADAFACE_INIT, ADAFACE_MOMENTUM, resolve_margins
from petal_fast.ops.margin_loss import check_reduction, check_settings, check_tensors, margin_loss_unchecked
from petal_fast.ops.margin_loss.per_row import adaface_update


class MarginLossHead(nn.Module):
    """Base of the margin heads: validated settings, ``weight`` (rows×D) and, for AdaFace, the
    buffers ``norm_mean`` μ and ``norm_std`` σ.

    ``rows``: how many class centres this process holds (all ``num_classes``, or its shard);
    ``min_classes``: the smallest valid ``num_classes`` and ``why`` what it is, for the error.
    """

    def __init__(self, embedding_dim: int, num_classes: int, rows: int | None, loss: str,
                 margins: tuple[float, ...] | None, scale: float, grad: str, label_smoothing: float,
                 sample_rate: float, h: float = ADAFACE_H, momentum: float = ADAFACE_MOMENTUM,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 min_classes: int = 1, why: str = "1") -> None:
        super().__init__()
        if not isinstance(embedding_dim, int) or embedding_dim < 1:
            raise ValueError(f"embedding_dim must be an integer >= 1, got {embedding_dim!r}")
        if not isinstance(num_classes, int) or num_classes < min_classes:
            raise ValueError(f"num_classes must be an integer >= {why}, got {num_classes!r}")
        check_settings(scale, label_smoothing, sample_rate, grad)
        if not (isinstance(h, (int, float)) and math.isfinite(h)):
            raise ValueError(f"h must be a finite number (AdaFace's norm weight), got {h!r}")
        if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.loss, self.margins = loss, resolve_margins(loss, margins)
        self.scale, self.grad, self.label_smoothing = float(scale), grad, float(label_smoothing)
        self.sample_rate, self.h, self.momentum = float(sample_rate), float(h), float(momentum)
        self.weight = nn.Parameter(torch.empty(num_classes if rows is None else rows, embedding_dim, device=device,
                                               dtype=dtype))
        nn.init.normal_(self.weight, std=0.01)  # as insightface Partial FC
        if loss == "adaface":
            self.register_buffer("norm_mean", torch.tensor(ADAFACE_INIT[0], device=device))
            self.register_buffer("norm_std", torch.tensor(ADAFACE_INIT[1], device=device))

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, num_classes={self.num_classes}, loss={self.loss!r}, "
                f"margins={self.margins}, scale={self.scale}, grad={self.grad!r}, "
                f"label_smoothing={self.label_smoothing}, sample_rate={self.sample_rate}")

    def adaface_stats(self, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(μ, σ) this step's loss uses: the buffers, moved by this batch's ``norms`` when training.
        ``None`` for the other losses. Nothing is written: :meth:`commit_adaface` does that."""
        if self.loss != "adaface":
            return None
        if not self.training:
            return self.norm_mean, self.norm_std
        return adaface_update(norms, self.norm_mean, self.norm_std, self.momentum)

    def commit_adaface(self, stats: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Write the moving averages :meth:`adaface_stats` returned, once the loss exists."""
        if stats is not None and self.training:
            self.norm_mean.copy_(stats[0])
            self.norm_std.copy_(stats[1])


class MarginSoftmaxLoss(MarginLossHead):
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
        out = margin_loss_unchecked(embeddings, self.weight, labels, self.loss, self.margins, self.scale,
                                            self.grad, self.label_smoothing, reduction, mean, std, self.h,
                                            self.sample_rate)
        self.commit_adaface(stats)
        return out
