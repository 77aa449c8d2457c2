"""The optimizer and learning-rate schedule of a training run."""
from __future__ import annotations

from typing import Callable

import torch

from petal_fast.config import TrainConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases, norms and 1-D tensors decay-free).

    On CUDA the fused implementation: one kernel per group, and its step counters live on the device
    (the default keeps them on the CPU and reads them on the host every step: no CUDA-graph capture)."""
    if not params:
        raise ValueError("nothing to train: every parameter is frozen")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = all(p.device.type == "cuda" for p in params) or None
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, fused=fused)


def warmup_linear(total: int, warmup: float) -> Callable[[int], float]:
    """Linear warm-up to the base lr over ``warmup`` steps (a fraction if ≤ 1), then linear decay to 0."""
    w = int(round(warmup * total)) if warmup <= 1 else int(warmup)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total - step) / max(1, total - w))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total_steps, cfg.warmup))
