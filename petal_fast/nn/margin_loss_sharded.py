"""Class-sharded (model-parallel) margin-softmax head, as insightface's Partial FC (docs/design.md §1.3).

Rank r of a ``world``-sized group owns the class centres [start_r, start_r + C_r) (C split as
evenly as possible, the first C mod world ranks one class more). Per step:

1. embeddings (B×D per rank, B equal on every rank: checked, a ValueError on every rank otherwise) and
   labels are all-gathered (B·world rows);
2. each rank runs the fused core over its shard: lse_r, zsum_r over its non-target classes, and
   the target cosine for the rows whose class it owns (0 elsewhere);
3. only B·world-long vectors are all-reduced: the target cosine (sum), the row max of lse_r (max),
   Σ_r exp(lse_r − max) (sum) and zsum_r (sum);
4. every rank forms the same loss over the whole global batch and all classes.

Partial FC (``sample_rate < 1``), as insightface's PartialFC_V2: each rank keeps the positives of its
shard among the gathered labels plus uniform negatives, k_r = min(C_r, max(⌈sample_rate·C_r⌉, B·world))
classes (``petal_fast.ops.margin_loss.partial_fc_sample``; sizes only, so it compiles), and the loss is
the softmax over the union of the kept classes (Σ_r k_r of them, the C of label smoothing).

Backward: each rank computes dW for its shard and its partial dE for the gathered rows; the
partials are summed (all-reduce) and each rank keeps the rows of its own embeddings. Every rank
must call ``backward`` on the returned (identical) loss. Works on gloo (CPU) and NCCL (CUDA).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from petal_fast.backend import resolve
from petal_fast.definitions.margin_loss import ADAFACE_H, ADAFACE_MOMENTUM
from petal_fast.ops._graph import no_functorch
from petal_fast.ops.margin_loss import (OP, check_reduction, check_tensors, margin_loss_core, partial_fc_count,
                                        partial_fc_sample)
from petal_fast.ops.margin_loss.per_row import adaface_zhat, combine, reduce, target_logit

from .margin_loss import MarginLossHead


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


class ShardedMarginSoftmaxLoss(MarginLossHead):
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
                 dtype: torch.dtype | None = None, sample_rate: float = 1.0) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedMarginSoftmaxLoss needs torch.distributed initialised (init_process_group)")
        world, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        start, end = shard_range(num_classes, world, rank) if isinstance(num_classes, int) else (0, 0)
        super().__init__(embedding_dim, num_classes, end - start, loss, margins, scale, grad, label_smoothing,
                         sample_rate, h, momentum, device, dtype, min_classes=world, why=f"world size {world}")
        self.group, self.world, self.rank, self.start, self.end = process_group, world, rank, start, end

    def _check_batch_sizes(self, labels: torch.Tensor) -> None:
        """ValueError on every rank unless every rank passes the same batch size: the gathers below
        need equal parts (unequal ones abort the process inside gloo / hang in NCCL). One
        all-gather of one number per rank; every rank sees the same sizes, so all raise together."""
        sizes = torch.empty(self.world, dtype=torch.long, device=labels.device)
        dist.all_gather_single(sizes, torch.tensor([labels.shape[0]], device=labels.device), group=self.group)
        if bool((sizes != sizes[0]).any()):
            raise ValueError(f"ShardedMarginSoftmaxLoss: every rank must pass the same batch size (embeddings and "
                             f"labels are gathered over the ranks); got {sizes.tolist()} for ranks "
                             f"0..{self.world - 1}. Drop the incomplete last batch (DataLoader drop_last=True) or "
                             "give every rank as many rows")

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        # the op's checks, once: labels are bounded by all classes, not this rank's shard
        check_tensors(embeddings, self.weight, labels, num_classes=self.num_classes)
        check_reduction(reduction)
        self._check_batch_sizes(labels)
        backend = resolve(embeddings.device, OP, supported=("torch", "cpp", "triton"))
        no_functorch("ShardedMarginSoftmaxLoss")
        e_all = _AllGather.apply(embeddings, self.group)
        labels_all = torch.empty(labels.numel() * self.world, dtype=torch.long, device=labels.device)
        dist.all_gather_single(labels_all, labels.long().contiguous(), group=self.group)
        local = labels_all - self.start
        owned = (local >= 0) & (local < self.weight.shape[0])
        weight, classes = self.weight, self.num_classes
        if self.sample_rate < 1.0:
            index, local = partial_fc_sample(local, self.weight.shape[0], self.sample_rate, owned=owned)
            weight = weight.index_select(0, index)
            classes = sum(partial_fc_count(e - s, labels_all.shape[0], self.sample_rate)
                          for s, e in (shard_range(self.num_classes, self.world, r) for r in range(self.world)))
        lse_r, zsum_r, cos_r = margin_loss_core(e_all, weight, torch.where(owned, local, -1), self.scale, backend)
        cos_t = _AllReduceSum.apply(cos_r, self.group)  # each row's target cosine, from its owner
        zhat = stats = None
        if self.loss == "adaface":
            norms = e_all.detach().to(cos_t.dtype).norm(dim=1)
            stats = self.adaface_stats(norms)
            zhat = adaface_zhat(norms, *stats, self.h)
        t = target_logit(cos_t, self.loss, self.margins, self.scale, self.grad, zhat)
        row_max = lse_r.detach().clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=self.group)
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        lse_nt = row_max + torch.log(_AllReduceSum.apply(torch.exp(lse_r - row_max), self.group))
        zsum_nt = _AllReduceSum.apply(zsum_r, self.group)
        out = reduce(combine(lse_nt, zsum_nt, t, classes, self.label_smoothing), reduction)
        self.commit_adaface(stats)
        return out
