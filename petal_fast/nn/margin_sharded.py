"""Class-sharded (model-parallel) margin-softmax head, as insightface's Partial FC (docs/design.md §1.3).

Rank r of a ``world``-sized group owns the class centres [start_r, start_r + C_r) (C split as
evenly as possible, the first C mod world ranks one class more). Per step:

1. embeddings (B×D per rank, B equal on every rank) and labels are all-gathered (B·world rows);
2. each rank runs the fused core over its shard: lse_r, zsum_r over its non-target classes, and
   the target cosine for the rows whose class it owns (0 elsewhere);
3. only B·world-long vectors are all-reduced: the target cosine (sum), the row max of lse_r (max),
   Σ_r exp(lse_r − max) (sum) and zsum_r (sum);
4. every rank forms the same loss over the whole global batch and all classes.

Backward: each rank computes dW for its shard and its partial dE for the gathered rows; the
partials are summed (all-reduce) and each rank keeps the rows of its own embeddings. Every rank
must call ``backward`` on the returned (identical) loss. Works on gloo (CPU) and NCCL (CUDA).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from petal_fast.backend import resolve
from petal_fast.definitions.margin import ADAFACE_H, ADAFACE_INIT, ADAFACE_MOMENTUM, GRADS, resolve_margins
from petal_fast.margin_math import adaface_update, adaface_zhat, combine, reduce, target_logit
from petal_fast.ops.margin_loss import OP, check_inputs, fused_core


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the gradients over ranks and keeps own rows."""

    @staticmethod
    def forward(ctx, x, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks of a B-long vector. Every rank forms the same loss from the sum, so each
    rank's share of the gradient is its local dL/dsum (identity backward)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def shard_range(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of the classes rank ``rank`` owns."""
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedMarginSoftmaxLoss(nn.Module):
    """MarginSoftmaxLoss with the class centres split over the ranks of ``process_group``.

    ``weight`` is this rank's shard (C_r×D); ``forward(embeddings, labels)`` takes this rank's
    embeddings and global labels and returns the loss over the global batch (``reduction="none"``:
    the B·world per-row losses, rank-major), the same value on every rank. Needs
    ``torch.distributed`` initialised and C ≥ world.
    """

    def __init__(self, embedding_dim: int, num_classes: int, loss: str = "cosface",
                 margins: tuple[float, ...] | None = None, scale: float = 64.0, grad: str = "exact",
                 label_smoothing: float = 0.0, h: float = ADAFACE_H, momentum: float = ADAFACE_MOMENTUM,
                 process_group: dist.ProcessGroup | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedMarginSoftmaxLoss needs torch.distributed initialised (init_process_group)")
        if grad not in GRADS:
            raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.group = process_group
        self.world, self.rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        if not isinstance(num_classes, int) or num_classes < self.world:
            raise ValueError(f"num_classes must be an integer >= world size {self.world}, got {num_classes!r}")
        self.embedding_dim, self.num_classes = embedding_dim, num_classes
        self.start, self.end = shard_range(num_classes, self.world, self.rank)
        self.loss, self.margins = loss, resolve_margins(loss, margins)
        self.scale, self.grad, self.label_smoothing = float(scale), grad, float(label_smoothing)
        self.h, self.momentum = float(h), float(momentum)
        self.weight = nn.Parameter(torch.empty(self.end - self.start, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.01)
        if loss == "adaface":
            self.register_buffer("norm_mean", torch.tensor(ADAFACE_INIT[0], device=device))
            self.register_buffer("norm_std", torch.tensor(ADAFACE_INIT[1], device=device))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        check_inputs(embeddings, self.weight, labels, self.scale, self.label_smoothing, 1.0, self.grad,
                     num_classes=self.num_classes, reduction=reduction)
        backend = resolve(embeddings.device, OP, supported=("torch", "cpp", "triton"))
        e_all = _AllGather.apply(embeddings, self.group)
        labels_all = torch.empty(labels.numel() * self.world, dtype=torch.long, device=labels.device)
        dist.all_gather_into_tensor(labels_all, labels.long().contiguous(), group=self.group)
        local = labels_all - self.start
        owned = (local >= 0) & (local < self.weight.shape[0])
        lse_r, zsum_r, cos_r = fused_core(e_all, self.weight, torch.where(owned, local, -1), self.scale, backend)
        cos_t = _AllReduceSum.apply(cos_r, self.group)  # each row's target cosine, from its owner
        zhat = mean = std = None
        if self.loss == "adaface":
            norms = e_all.detach().to(cos_t.dtype).norm(dim=1)
            mean, std = self.norm_mean, self.norm_std
            if self.training:
                mean, std = adaface_update(norms, mean, std, self.momentum)
            zhat = adaface_zhat(norms, mean, std, self.h)
        t = target_logit(cos_t, self.loss, self.margins, self.scale, self.grad, zhat)
        row_max = lse_r.detach().clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=self.group)
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        lse_nt = row_max + torch.log(_AllReduceSum.apply(torch.exp(lse_r - row_max), self.group))
        zsum_nt = _AllReduceSum.apply(zsum_r, self.group)
        out = reduce(combine(lse_nt, zsum_nt, t, self.num_classes, self.label_smoothing), reduction)
        if self.loss == "adaface" and self.training:
            self.norm_mean.copy_(mean)
            self.norm_std.copy_(std)
        return out
