"""Many processes (``torchrun``): process group, DDP, the class-sharded head, global gradient clipping.

With one process every method is a pass-through, so the trainer reads the same either way.
"""
from __future__ import annotations

import atexit
import gc
import os
import weakref
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from petal_fast.config import TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def _init_process_group(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # DDP imports Dynamo, and with it torch.distributed.fsdp; imported after the group exists, that
        # import keeps a reference to the group which destroy_process_group cannot drop, and Gloo's
        # threads outlive the exit teardown (tests/test_train.py). `import petal_fast` no longer
        # imports Dynamo (tests/test_import.py), so a distributed run imports it here, first.
        import torch._dynamo  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # The group is ours, so is its teardown. A process that exits with the group alive can die
        # of SIGABRT ("terminate called without an active exception"): Gloo's worker threads still
        # hold finished work whose tensors are freed while the interpreter is being torn down.
        atexit.register(_teardown)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_WRAPPED: weakref.WeakSet[Distributed] = weakref.WeakSet()  # those holding a DDP wrapper


def _teardown() -> None:
    """At exit, while Python still runs: drop every DDP wrapper (each holds the process group, so
    destroy_process_group alone would leave the group and its worker threads alive), then the group,
    whose destructor joins its threads."""
    for wrapper in list(_WRAPPED):
        wrapper.ddp = wrapper.forward = None
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


class _EmbeddingNet(nn.Module):
    """``images → model.embedding(images)`` with only the backbone registered (the head stays out of DDP)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        object.__setattr__(self, "_model", model)  # not a submodule: its head is not DDP's to sync

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._model.embedding(images)


def _allreduce_sum_hook(state, bucket):
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class Distributed:
    """This process's rank in the run and the wrappers that many processes need."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rank, self.world = _init_process_group(device)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.forward: nn.Module | None = None  # what the loss runs: DDP or the model, compiled or not
        self.sharded = False

    def wrap(self, model: nn.Module, cfg: TrainConfig) -> None:
        """Shard the head's classes over the ranks (``sharded_head``) and put the rest under DDP.

        With ``compile = true`` the module DDP wraps is compiled with ``fullgraph=True``: the model's
        forward and fused margin loss as one graph (AOTAutograd compiles the backward), or with a
        sharded head the embedding only (the head's collectives stay eager). DDP wraps the compiled
        module, not the reverse: Dynamo cannot trace DDP's own forward in one graph (its logger call,
        torch 2.13). The optimizer step stays eager: it is conditional on a finite loss and gradient.
        ``cuda_graphs = true`` compiles the same way with ``mode="reduce-overhead"`` (CUDA devices only)."""
        self.sharded = self.world > 1 and cfg.sharded_head
        if self.sharded:
            self._shard_head(model, cfg)
        # A sharded head must stay outside DDP: DDP would broadcast rank 0's class shard to every
        # rank and average shard gradients that belong to different classes.
        net = _EmbeddingNet(model) if self.sharded else model
        if cfg.compile or cfg.cuda_graphs:
            # reduce-overhead: Inductor records the forward and backward graphs as CUDA graphs and replays
            # them (static shapes per batch size); nothing in them may be a CPU tensor or a host sync
            net = torch.compile(net, fullgraph=True, **({"mode": "reduce-overhead"} if cfg.cuda_graphs else {}))
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            _WRAPPED.add(self)
            if self.sharded:
                # The sharded loss is already the global-batch mean on every rank and each rank's
                # backbone gradient covers only its own rows: sum them instead of averaging.
                self.ddp.register_comm_hook(None, _allreduce_sum_hook)
        self.forward = self.ddp or net

    def _shard_head(self, model: nn.Module, cfg: TrainConfig) -> None:
        from petal_fast.nn.margin_loss_sharded import ShardedMarginSoftmaxLoss
        old = model.head
        loss, margins = cfg.margin_args()
        model.head = ShardedMarginSoftmaxLoss(old.embedding_dim, old.num_classes, loss=loss, margins=margins,
                                              scale=cfg.loss_scale, grad=cfg.grad, device=self.device,
                                              sample_rate=cfg.sample_rate)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The model's loss on this rank's batch, through DDP when there is one."""
        # no DDP when forward is unset (before wrap, after the exit teardown); `is not None`: a compiled
        # module has no truth value
        module = self.forward if self.forward is not None else model
        return model.head(module(images), labels) if self.sharded else module(images, labels)

    def together(self, check: Callable[[], None]) -> None:
        """Run ``check`` on every rank and fail on every rank if it fails on any (a rank that raised
        alone would leave the others waiting in the next collective): this rank's own error, else a
        ValueError saying which ranks refused."""
        try:
            check()
            error = None
        except (ValueError, OSError) as err:
            error = err
        if self.world == 1:
            if error is not None:
                raise error
            return
        failed = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        flags = [torch.zeros_like(failed) for _ in range(self.world)]
        dist.all_gather(flags, failed)
        if error is not None:
            raise error
        ranks = [r for r, f in enumerate(flags) if f.item()]
        if ranks:
            raise ValueError(f"rank(s) {', '.join(map(str, ranks))} refused to start (their error says why); "
                             f"rank {self.rank} stops with them")

    def all_true(self, ok: torch.Tensor) -> bool:
        """True only if ``ok`` holds on every rank (a step is skipped everywhere or nowhere)."""
        if self.world > 1:
            flag = ok.float().to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = flag > 0
        return bool(ok)

    def clip_gradients(self, model: nn.Module, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping.

        With a sharded head every rank holds other class centres: their squared norms are summed
        over the ranks so that every rank computes the same norm (and the same clip factor)."""
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        head = set(map(id, model.head.parameters()))
        grads = [p.grad for p in params if p.grad is not None]
        own = [p.grad for p in params if p.grad is not None and id(p) not in head]
        shard = [p.grad for p in params if p.grad is not None and id(p) in head]
        sq = lambda gs: sum((g.float().pow(2).sum() for g in gs), torch.zeros((), device=self.device))  # noqa: E731
        shard_sq = sq(shard)
        dist.all_reduce(shard_sq)
        norm = (sq(own) + shard_sq).sqrt()
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(factor.to(g.dtype))
        return norm

    def full_head_weight(self, model: nn.Module) -> torch.Tensor:
        """All class centres (C×D) of a sharded head, gathered from every rank (a collective)."""
        from petal_fast.nn.margin_loss_sharded import shard_range
        head = model.head
        ranges = [shard_range(head.num_classes, self.world, r) for r in range(self.world)]
        rows = max(e - s for s, e in ranges)
        padded = head.weight.detach().new_zeros(rows, head.weight.shape[1])
        padded[:head.weight.shape[0]] = head.weight.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:e - s] for part, (s, e) in zip(parts, ranges)]).cpu()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
