"""The demo's sizes (``--preset``) and the adaptation methods it compares."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoPreset:
    """One demo size. Identities are disjoint between pretraining, adaptation, evaluation and
    distractors; each adaptation identity has ``adapt_hq`` higher-quality and ``adapt_lq``
    low-quality images (the mixed-quality setting of TinyFace / BRIAR); each evaluation identity has
    one higher-quality gallery image and ``eval_probes`` further images (probes)."""
    backbone: str
    pretrain_identities: int
    pretrain_images: int
    adapt_identities: int
    adapt_hq: int
    adapt_lq: int
    eval_identities: int
    eval_probes: int
    distractors: int
    pretrain_epochs: int
    adapt_epochs: int
    batch_size: int
    seeds: int = 3                # adaptation runs per method (mean ± std); pretraining runs once
    rank: int = 8                 # per PETALface branch; LoRA gets 2 × rank, the same total
    pretrain_lr: float = 2e-3
    adapt_lr: float = 2e-3        # adapters and head (the paper's 5e-4 is for its 215 M-parameter Swin)
    full_ft_lr: float = 2e-4      # full fine-tuning needs a smaller step to stay stable
    pairs: int = 1000             # verification pairs per protocol
    calibrate_batches: int = 8    # training batches whose median BRISQUE becomes τ


PRESETS = {
    # CI smoke run: every stage and method, two seeds, a few steps each (seconds).
    "tiny": DemoPreset("tiny", 12, 4, 10, 2, 4, 8, 3, 8, 1, 1, 16, seeds=2, pairs=40, calibrate_batches=2),
    # The default on a 2-core CPU (≤ 15 minutes quiet): 1 pretraining + 4 methods × 3 seeds.
    "cpu": DemoPreset("tiny", 500, 16, 200, 3, 9, 100, 6, 300, 10, 10, 64),
    # GPU: the same design at 4× the data, 5 seeds, on the 40 px model (minutes on one GPU) ...
    "gpu": DemoPreset("tiny", 2000, 20, 800, 4, 12, 400, 8, 2000, 15, 15, 128, seeds=5, pairs=6000),
    # ... and on the small Swin at the paper's 120 px input (TinyFace-like 18–42 px low quality).
    "gpu-small": DemoPreset("small", 2000, 20, 800, 4, 12, 400, 8, 2000, 20, 10, 128, seeds=3, pretrain_lr=1e-3,
                            pairs=6000),
}

# method → what its runs change in the adaptation config (besides the shared recipe)
FIXED_ALPHA = 0.5
METHODS = ("full_ft", "lora", "petalface", "petalface_fixed")
LABELS = {"pretrained": "pretrained", "full_ft": "full fine-tuning", "lora": "LoRA (rank 2r)",
          "petalface": "PETALface", "petalface_fixed": f"PETALface, α = {FIXED_ALPHA}"}


def method_overrides(method: str, p: DemoPreset) -> dict:
    """TrainConfig fields of one method. LoRA's single branch has rank 2r on the targets, PETALface's
    two branches r each: the same total rank and parameter count; both put rank r on the feature Linear."""
    if method == "full_ft":
        return {"mode": "full_ft", "lr": p.full_ft_lr}
    if method == "lora":
        return {"mode": "lora", "rank": 2 * p.rank, "feature_rank": p.rank, "lr": p.adapt_lr}
    if method == "petalface":
        return {"mode": "petalface", "rank": p.rank, "lr": p.adapt_lr}
    if method == "petalface_fixed":
        return {"mode": "petalface", "rank": p.rank, "fixed_alpha": FIXED_ALPHA, "lr": p.adapt_lr}
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
