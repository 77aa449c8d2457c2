"""The PETALface training entry point (single process or ``torchrun --nproc_per_node=N``).

    petal-fast train --config configs/petalface.toml [key=value ...]
    python -m petal_fast.train --config ...
    torchrun --nproc_per_node=2 -m petal_fast.train --config ... sharded_head=true

Modes: ``pretrain`` (backbone from scratch), ``petalface`` (quality-weighted two-branch adapters),
``lora`` (single-branch adapters), ``full_ft`` (full fine-tuning). Per step: images → (quality → α)
→ model → margin loss → backward → clip → AdamW; a non-finite loss or gradient skips the step.
Checkpoints are atomic and hold the trainable weights, optimizer, scheduler, RNG states, data
position, α calibration and config; a resumed run reproduces an uninterrupted one.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from petal_fast import checkpointing
from petal_fast.config import ConfigError, TrainConfig, load_config
from petal_fast.nn import PetalLinear

__all__ = ["Trainer", "TrainResult", "main", "train"]


# --- distributed ---------------------------------------------------------------------------------
def _init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


# --- data ----------------------------------------------------------------------------------------
def build_dataset(cfg: TrainConfig, image_size: int):
    """The training set named by ``cfg.data`` (degraded to low resolution when ``data.degrade``);
    RecordIO and ImageFolder images of any size come out at the model's ``image_size``."""
    from petal_fast.data import Degrade, DegradedFaces, ImageFolderFaces, RecordIO, ResizedFaces, SyntheticFaces
    d = cfg.data
    if d.kind == "synthetic":
        ds = SyntheticFaces(d.num_identities, d.images_per_identity, size=d.size or image_size, seed=d.seed,
                            identity_offset=d.identity_offset)
        ds.load(progress=False)
    elif d.kind == "recordio":
        ds = RecordIO(d.path)
    else:
        ds = ImageFolderFaces(d.path)
    if d.degrade:
        out_size = None if d.kind == "synthetic" else image_size
        ds = DegradedFaces(ds, Degrade(out_size=out_size, resolution=tuple(d.resolution)), seed=cfg.seed)
    elif d.kind != "synthetic":
        ds = ResizedFaces(ds, image_size)
    return ds


def dataset_labels(ds) -> np.ndarray | None:
    """Every label of the data set when it holds them in memory (not RecordIO: see :func:`dataset_num_classes`)."""
    inner = getattr(ds, "dataset", ds)
    labels = getattr(inner, "labels", None)
    return None if labels is None else np.asarray(labels)


def dataset_num_classes(ds) -> int | None:
    """The data set's class count: its ``num_classes`` (a RecordIO pack's header, or its scanned labels),
    else 1 + its largest label; None when it says neither."""
    inner = ds
    while getattr(inner, "num_classes", None) is None and hasattr(inner, "dataset"):
        inner = inner.dataset
    n = getattr(inner, "num_classes", None)
    if n is not None:
        return int(n)
    labels = dataset_labels(ds)
    return int(labels.max()) + 1 if labels is not None and labels.size else None


def resolve_num_classes(cfg: TrainConfig, ds) -> int:
    """``num_classes`` from the config, else from the data; an error if neither gives one or they disagree."""
    from_data = dataset_num_classes(ds)
    labels = dataset_labels(ds)
    top = int(labels.max()) if labels is not None and labels.size else None
    if cfg.num_classes is None:
        if from_data is None:
            raise ConfigError("cannot tell how many classes the training data has: set num_classes=<number of identities>")
        return from_data
    if top is not None and top >= cfg.num_classes:
        raise ConfigError(f"num_classes={cfg.num_classes} but the data has labels up to {top}: "
                          f"set num_classes >= {top + 1} (or leave it unset to take it from the data)")
    if from_data is not None and from_data > cfg.num_classes:
        raise ConfigError(f"num_classes={cfg.num_classes} but the data declares {from_data} classes: set "
                          f"num_classes >= {from_data} (or leave it unset to take it from the data)")
    return cfg.num_classes


# Keys that do not change what a run computes: a resumed run may differ from the saved one in these.
RESUME_FREE = ("output", "resume", "progress", "log_every", "save_every", "device", "data.num_workers")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "backbone_overrides":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def config_differences(saved: dict, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, current value)} for every key that changes the run (keys the saved config
    lacks take their defaults: files written before a key existed ran with its default)."""
    old = _flatten(TrainConfig().to_dict()) | _flatten(saved)
    new = _flatten(cfg.to_dict())
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in RESUME_FREE and old.get(k) != new.get(k)}


def check_same_run(path: Path, saved: Any, cfg: TrainConfig) -> None:
    """Refuse to continue (or overwrite) the run saved at ``path`` unless its config equals ``cfg``."""
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds no training config, so it cannot be told whether it belongs to this run: "
                         f"use a new output folder, or resume=false to start over in {path.parent} (overwrites it)")
    diff = config_differences(saved, cfg)
    if diff:
        listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ConfigError(
            f"output folder {path.parent} holds a run with another config ({path.name}), differing in "
            f"{', '.join(diff)} ({listed}). Resuming would continue that run and ignore the new values. Either "
            f"choose a new output folder (output=<new folder>), or start over in this one with resume=false "
            f"(its checkpoint and model.pt are overwritten).")


class StepBatches(torch.utils.data.Sampler):
    """Per-step index lists: epoch permutation from (seed, epoch); global batch = batch × world; this
    rank's slice; the first ``start`` steps skipped (resume). Incomplete global batches are dropped."""

    def __init__(self, n: int, batch: int, world: int, rank: int, seed: int, epoch: int, start: int = 0):
        self.n, self.batch, self.world, self.rank = n, batch, world, rank
        self.seed, self.epoch, self.start = seed, epoch, start

    def steps(self) -> int:
        return self.n // (self.batch * self.world)

    def __len__(self) -> int:
        return max(0, self.steps() - self.start)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        gb = self.batch * self.world
        for s in range(self.start, self.steps()):
            lo = s * gb + self.rank * self.batch
            yield perm[lo:lo + self.batch]


# --- model ---------------------------------------------------------------------------------------
def build_training_model(cfg: TrainConfig, num_classes: int, device: torch.device):
    from petal_fast.models import build_model
    loss, margins = cfg.margin_args()
    common = dict(loss=loss, margins=margins, loss_scale=cfg.loss_scale, grad=cfg.grad,
                  head_kwargs={"sample_rate": cfg.sample_rate} if cfg.sample_rate < 1 else None)
    backbone: Any = cfg.backbone
    if cfg.backbone_overrides or cfg.paper_compat:
        from petal_fast.models import build_backbone
        extra = dict(cfg.backbone_overrides)
        if not cfg.backbone.startswith("vit"):
            extra["paper_compat"] = cfg.paper_compat
        backbone = build_backbone(cfg.backbone, **extra)
    if cfg.mode in ("lora", "petalface"):
        common.update(rank=cfg.rank, scale=cfg.scale, dropout=cfg.dropout, targets=tuple(cfg.targets),
                      feature_lora=cfg.feature_lora)
    if cfg.mode == "petalface":
        common.update(quality=cfg.quality, alpha_mode=cfg.alpha_mode)
    model = build_model(cfg.mode, backbone=backbone, num_classes=num_classes, pretrained=cfg.pretrained,
                        strict=False, **common)
    return model.to(device)


def set_train_mode(model: nn.Module, cfg: TrainConfig) -> None:
    """Adapter modes keep the frozen backbone frozen: BatchNorm statistics and backbone dropout stay
    those of the pretrained model (eval mode); adapters (their dropout) and the head train."""
    model.train()
    if cfg.mode in ("lora", "petalface") and not cfg.backbone_train_mode:
        model.backbone.eval()
        for m in model.backbone.modules():
            if isinstance(m, PetalLinear):
                m.train()


def image_size_of(model: nn.Module) -> int:
    size = getattr(model.backbone, "img_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if not isinstance(size, int):
        raise TypeError(f"backbone {type(model.backbone).__name__} must expose an integer img_size")
    return size


def preset_image_size(cfg: TrainConfig) -> int:
    """Input size of the configured backbone preset, without building it."""
    from petal_fast.models import SWIN_PRESETS, VIT_PRESETS
    name = cfg.backbone
    table = VIT_PRESETS if name.startswith("vit") else SWIN_PRESETS
    key = name if name in table else name.split("_", 1)[-1]
    if key not in table:
        raise ValueError(f"unknown backbone preset {name!r}")
    return int(cfg.backbone_overrides.get("img_size", table[key]["img_size"]))


def prepare_images(images: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """[0, 1] batch → model input: resized to the backbone's size, normalised to [−1, 1] (insightface)."""
    images = images.to(device, non_blocking=True)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images.sub_(0.5).div_(0.5)


# --- schedule ------------------------------------------------------------------------------------
def warmup_linear(total: int, warmup: float):
    """Linear warm-up to the base lr over ``warmup`` steps (a fraction if ≤ 1), then linear decay to 0."""
    w = int(round(warmup * total)) if warmup <= 1 else int(warmup)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return max(0.0, (total - step) / max(1, total - w))
    return factor


# --- the loop ------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int = 0
    skipped: int = 0
    images: int = 0
    seconds: float = 0.0
    final_loss: float = float("nan")
    losses: list[float] = field(default_factory=list)
    output: str = ""
    trainable: int = 0
    total: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        final = f"{self.final_loss:.4f}" if self.losses else "— (no step run: the run in output was already complete)"
        rows = [("steps", f"{self.steps}"), ("skipped (non-finite)", f"{self.skipped}"),
                ("images", f"{self.images}"), ("time", f"{self.seconds:.1f} s"),
                ("throughput", f"{self.images_per_second:.1f} img/s"), ("final loss", final),
                ("trainable", f"{self.trainable:,} of {self.total:,} ({100 * self.trainable / max(1, self.total):.3f}%)"),
                ("output", self.output)]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


class Trainer:
    """Owns model, optimizer, schedule, data order and checkpoints for one training run."""

    def __init__(self, cfg: TrainConfig, model: nn.Module | None = None, dataset=None):
        self.cfg = cfg.validate()
        self.device = _resolve_device(cfg.device)
        self.rank, self.world = _init_distributed(self.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.image_size = image_size_of(model) if model is not None else preset_image_size(cfg)
        self.dataset = dataset if dataset is not None else build_dataset(cfg, self.image_size)
        labels = dataset_labels(self.dataset)
        if model is None:
            self.num_classes = resolve_num_classes(cfg, self.dataset)
        else:
            self.num_classes = getattr(getattr(model, "head", None), "num_classes", None)
        torch.manual_seed(cfg.seed)  # the model's init must not depend on how the data was built
        self.model = model if model is not None else build_training_model(cfg, self.num_classes, self.device)
        head = getattr(self.model, "head", None)
        if head is None:
            raise ValueError("the model has no margin head to train: build it with num_classes")
        if labels is not None and labels.size and labels.max() >= head.num_classes:
            raise ValueError(f"the data has labels up to {int(labels.max())} but the margin head has "
                             f"{head.num_classes} classes: set num_classes or check the data set")
        if cfg.sharded_head and self.world > 1:
            self._shard_head()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: every parameter is frozen")
        decay = [p for p in self.params if p.dim() >= 2]
        no_decay = [p for p in self.params if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        self.steps_per_epoch = StepBatches(len(self.dataset), cfg.batch_size, self.world, self.rank, cfg.seed, 0).steps()
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data set has {len(self.dataset)} images, fewer than one global batch of "
                             f"{cfg.batch_size * self.world}: lower batch_size")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_linear(self.total_steps, cfg.warmup))
        self.step, self.skipped = 0, 0
        self.output = Path(cfg.output)
        self.ddp = None
        self.sharded = cfg.sharded_head and self.world > 1
        if self.world > 1:
            # A sharded head must stay outside DDP: DDP would broadcast rank 0's class shard to every
            # rank and average shard gradients that belong to different classes.
            net = _EmbeddingNet(self.model) if self.sharded else self.model
            self.ddp = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.sharded:
                # The sharded loss is already the global-batch mean on every rank and each rank's
                # backbone gradient covers only its own rows: sum them instead of averaging.
                self.ddp.register_comm_hook(None, _allreduce_sum_hook)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.amp if cfg.amp != "auto" else ("bf16" if self.device.type == "cuda" else "off"))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        # compile = true: forward and fused margin loss as one graph (no graph break; AOTAutograd compiles
        # the backward); the optimizer step stays eager (it is conditional on a finite loss and gradient)
        self.forward_fn = torch.compile(self.ddp or self.model, fullgraph=True) if cfg.compile else (self.ddp or self.model)
        set_train_mode(self.model, cfg)

    # -- pieces ---------------------------------------------------------------------------------
    def _shard_head(self) -> None:
        from petal_fast.nn.margin_sharded import ShardedMarginSoftmaxLoss
        old = self.model.head
        loss, margins = self.cfg.margin_args()
        self.model.head = ShardedMarginSoftmaxLoss(old.embedding_dim, old.num_classes, loss=loss, margins=margins,
                                                   scale=self.cfg.loss_scale, grad=self.cfg.grad,
                                                   device=self.device)

    def full_head_weight(self) -> torch.Tensor:
        """All class centres (C×D) of a sharded head, gathered from every rank (a collective)."""
        from petal_fast.nn.margin_sharded import shard_range
        head = self.model.head
        ranges = [shard_range(head.num_classes, self.world, r) for r in range(self.world)]
        rows = max(e - s for s, e in ranges)
        padded = head.weight.detach().new_zeros(rows, head.weight.shape[1])
        padded[:head.weight.shape[0]] = head.weight.detach()
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:e - s] for part, (s, e) in zip(parts, ranges)]).cpu()

    def loader(self, epoch: int, start: int = 0):
        from petal_fast.data import collate_faces
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        sampler = StepBatches(len(self.dataset), self.cfg.batch_size, self.world, self.rank, self.cfg.seed, epoch, start)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=sampler, collate_fn=collate_faces,
                                           num_workers=self.cfg.data.num_workers,
                                           generator=torch.Generator().manual_seed(self.cfg.seed + epoch),
                                           pin_memory=self.device.type == "cuda")

    def calibrate(self) -> None:
        """τ of the quality → α mapping from the median quality of the first training batches."""
        if self.cfg.mode != "petalface" or not hasattr(self.model, "calibrate_quality"):
            return
        batches = []
        for i, (images, _labels) in enumerate(self.loader(0)):
            if i >= self.cfg.calibrate_batches:
                break
            batches.append(prepare_images(images, self.image_size, self.device))
        self.model.calibrate_quality(torch.cat(batches), progress=False)

    def state(self, epoch: int, step_in_epoch: int) -> dict[str, Any]:
        from petal_fast.models import full_state_dict, trainable_state_dict
        weights = trainable_state_dict(self.model) if self.cfg.mode in ("lora", "petalface") \
            else full_state_dict(self.model)
        return {"model": weights, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "skipped": self.skipped, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "rng": checkpointing.rng_state(), "config": self.cfg.to_dict(), "world": self.world}

    def save(self, epoch: int, step_in_epoch: int) -> None:
        state = self.state(epoch, step_in_epoch)  # every rank builds it (sharded heads differ per rank)
        if self.world > 1 and self.cfg.sharded_head:
            checkpointing.atomic_save(state, self.output / f"checkpoint_last.rank{self.rank}.pt")
        elif self.rank == 0:
            checkpointing.atomic_save(state, self.output / checkpointing.LAST)
        if self.world > 1:
            dist.barrier()

    def resume(self) -> tuple[int, int]:
        """Continue from ``<output>/checkpoint_last.pt`` if ``resume`` and it exists — only when it was
        written by a run with the same config (:data:`RESUME_FREE` keys aside); otherwise refuse,
        before anything is loaded or written."""
        name = f"checkpoint_last.rank{self.rank}.pt" if self.world > 1 and self.cfg.sharded_head else checkpointing.LAST
        path = self.output / name
        if not self.cfg.resume:
            return 0, 0
        if not path.exists():
            model_pt = self.output / "model.pt"
            if model_pt.exists():  # a finished run whose checkpoint is gone: do not overwrite it silently
                from petal_fast.models import safe_load
                meta = safe_load(model_pt).get("metadata", {})
                check_same_run(model_pt, meta.get("config") if isinstance(meta, dict) else None, self.cfg)
            return 0, 0
        state = checkpointing.load(path)
        check_same_run(path, state.get("config"), self.cfg)
        missing = [k for k in ("model", "optimizer", "scheduler", "step", "skipped", "epoch", "step_in_epoch", "rng")
                   if k not in state]
        if missing:
            raise checkpointing.CheckpointFileError(f"checkpoint {path} lacks {', '.join(missing)}: it was not written "
                                                    "by petal-fast train; start over with resume=false")
        if state.get("world", 1) != self.world:
            raise ValueError(f"{path} was written by {state.get('world')} processes, this run has {self.world}")
        unknown = [k for k in state["model"] if k not in self.model.state_dict()]
        if unknown:
            raise ValueError(f"{path} does not fit this model; unknown keys: {unknown[:5]}")
        # a checkpoint that fails half-way must leave model, optimizer, schedule and RNG as they were
        backup = ({k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                   for k, v in self.model.state_dict().items()},
                  copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.scheduler.state_dict()),
                  checkpointing.rng_state())
        try:
            self.model.load_state_dict(state["model"], strict=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            checkpointing.set_rng_state(state["rng"])
            self.step, self.skipped = int(state["step"]), int(state["skipped"])
            return int(state["epoch"]), int(state["step_in_epoch"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            self.model.load_state_dict(backup[0])
            self.optimizer.load_state_dict(backup[1])
            self.scheduler.load_state_dict(backup[2])
            checkpointing.set_rng_state(backup[3])
            self.step, self.skipped = 0, 0
            raise checkpointing.CheckpointFileError(
                f"checkpoint {path} does not fit this run ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); "
                "start over with resume=false or use a new output folder") from None

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
        """One optimisation step; returns (loss, applied). Non-finite loss/grad → skipped, nothing updated."""
        module = self.forward_fn
        head = getattr(self.model, "head", None)
        if head is not None and (labels.min() < 0 or labels.max() >= head.num_classes):
            raise ValueError(f"label out of range [0, {head.num_classes}): got {labels.min().item()}…"
                             f"{labels.max().item()}; no update was made. The data set holds more classes than "
                             f"the head: set num_classes (or check the data set's labels)")
        # BatchNorm statistics a skipped step must not keep (a NaN batch would poison them)
        stats = {n: b.detach().clone() for n, b in self.model.named_buffers()
                 if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.model.head(module(images), labels) if self.sharded else module(images, labels)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        norm = self._clip_gradients()
        ok = torch.isfinite(loss.detach()) & torch.isfinite(norm)
        if self.world > 1:
            flag = ok.float().to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = flag > 0
        applied = bool(ok)
        if applied:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        else:
            self.skipped += 1
            buffers = dict(self.model.named_buffers())
            with torch.no_grad():
                for n, b in stats.items():
                    buffers[n].copy_(b)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step calls the scheduler before the optimizer: intended
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step += 1
        return float(loss.detach()), applied

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the global gradient norm to ``grad_clip``; returns the norm before clipping.

        With a sharded head every rank holds other class centres: their squared norms are summed
        over the ranks so that every rank computes the same norm (and the same clip factor)."""
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        head = set(map(id, self.model.head.parameters()))
        grads = [p.grad for p in self.params if p.grad is not None]
        own = [p.grad for p in self.params if p.grad is not None and id(p) not in head]
        shard = [p.grad for p in self.params if p.grad is not None and id(p) in head]
        sq = lambda gs: sum((g.float().pow(2).sum() for g in gs), torch.zeros((), device=self.device))  # noqa: E731
        shard_sq = sq(shard)
        dist.all_reduce(shard_sq)
        norm = (sq(own) + shard_sq).sqrt()
        factor = (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(factor.to(g.dtype))
        return norm

    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to the configured end (or only until global step ``stop_after``, as if interrupted:
        the schedule still spans the whole run, so a later resume continues it exactly)."""
        cfg = self.cfg
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        start_epoch, start_in_epoch = self.resume()  # first: a refused resume changes nothing
        self.output.mkdir(parents=True, exist_ok=True)
        checkpointing.clean_stale_tmp(self.output)  # temporary files of a process killed mid-write
        fresh = self.step == 0
        if fresh:
            self.calibrate()
        result = TrainResult(output=str(self.output))
        result.trainable = sum(p.numel() for p in self.params)
        result.total = sum(p.numel() for p in self.model.parameters())
        # a fresh start replaces the log of an earlier attempt; a resumed run continues it
        log = open(self.output / "log.jsonl", "w" if fresh else "a") if self.rank == 0 else None
        writer = _tensorboard(self.output) if self.rank == 0 else None
        bar = _progress(total=self.total_steps, initial=self.step, enabled=cfg.progress and self.rank == 0)
        set_train_mode(self.model, cfg)
        t0 = time.perf_counter()
        try:
            for epoch in range(start_epoch, math.ceil(self.total_steps / self.steps_per_epoch)):
                first = start_in_epoch if epoch == start_epoch else 0
                for i, (images, labels, *_rest) in enumerate(self.loader(epoch, first), start=first):
                    if self.step >= end:
                        break
                    images = prepare_images(images, self.image_size, self.device)
                    loss, applied = self.train_step(images, labels.to(self.device))
                    result.losses.append(loss)
                    result.images += images.shape[0] * self.world
                    done = i + 1 == self.steps_per_epoch
                    # also at the last step: a run ended by max_steps mid-epoch must be resumable too
                    if (cfg.save_every and self.step % cfg.save_every == 0) or (done and not cfg.save_every) \
                            or self.step == self.total_steps:
                        self.save(epoch + 1 if done else epoch, 0 if done else i + 1)
                    if log is not None and (self.step % cfg.log_every == 0 or not applied):
                        rec = {"step": self.step, "epoch": epoch, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                               "applied": applied, "skipped": self.skipped,
                               "images_per_s": result.images / max(1e-9, time.perf_counter() - t0)}
                        log.write(json.dumps(rec) + "\n")
                        log.flush()
                        if writer is not None:
                            writer.add_scalar("train/loss", loss, self.step)
                            writer.add_scalar("train/lr", rec["lr"], self.step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{result.images / max(1e-9, time.perf_counter() - t0):.0f}",
                                    skipped=self.skipped)
                if self.step >= end:
                    break
        finally:
            bar.close()
            if log is not None:
                log.close()
            if writer is not None:
                writer.close()
        result.seconds = time.perf_counter() - t0
        result.steps, result.skipped = self.step, self.skipped
        result.final_loss = result.losses[-1] if result.losses else float("nan")
        full_head = self.full_head_weight() if self.sharded and self.step >= self.total_steps else None
        # a rerun of a finished run trains nothing and leaves its model.pt as it is
        rewrite = bool(result.losses) or not (self.output / "model.pt").exists()
        if self.rank == 0 and self.step >= self.total_steps and rewrite:
            from petal_fast.models import full_state_dict, trainable_state_dict
            weights = trainable_state_dict(self.model) if cfg.mode in ("lora", "petalface") \
                else full_state_dict(self.model)
            if full_head is not None:  # model.pt holds every class centre, whatever the world size
                weights["head.weight"] = full_head
            checkpointing.atomic_save({"state_dict": weights, "metadata": {"config": cfg.to_dict()}},
                                      self.output / "model.pt")
            checkpointing.atomic_write_text(json.dumps(
                {k: v for k, v in vars(result).items() if k != "losses"} | {"images_per_second": result.images_per_second},
                indent=2), self.output / "summary.json")
        return result


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


def _progress(total: int, initial: int, enabled: bool):
    from petal_fast.progress import progress
    return progress(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the JSON-lines log is always written
        return None
    return SummaryWriter(str(output / "tb"))


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a trained model from its run directory: config + pretrained backbone + ``model.pt``."""
    from petal_fast.models import load_petalface_checkpoint, safe_load
    run_dir = Path(run_dir)
    path = run_dir / "model.pt" if run_dir.is_dir() else run_dir
    raw = safe_load(path)
    meta = raw.get("metadata", {}) if isinstance(raw, dict) else {}
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) \
            or not isinstance(raw.get("state_dict"), dict):
        raise ValueError(f"{path} has no training config and state dict: was it written by petal-fast train?")
    try:
        cfg = load_config(None, **meta["config"])
    except ValueError as err:
        raise ValueError(f"{path}: the saved training config is not valid here: {err}") from None
    head = {k: v for k, v in raw["state_dict"].items() if k == "head.weight"}
    num_classes = int(head["head.weight"].shape[0]) if head else None
    model = build_training_model(cfg, num_classes, torch.device(device))
    load_petalface_checkpoint(model, raw["state_dict"], strict=False)
    return model.eval()


def train(cfg: TrainConfig, model: nn.Module | None = None, dataset=None) -> tuple[Trainer, TrainResult]:
    trainer = Trainer(cfg, model=model, dataset=dataset)
    return trainer, trainer.fit()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="petal-fast train", description="Train PETALface (or a baseline).")
    ap.add_argument("--config", help="TOML or JSON config file (see configs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-3 mode=lora data.path=x.rec")
    args = ap.parse_args(argv)
    from petal_fast.cli import report_errors
    return report_errors("petal-fast train", _run, args)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    trainer, result = train(cfg)
    if trainer.rank == 0:
        print("\nTraining summary")
        print(result.summary())
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
