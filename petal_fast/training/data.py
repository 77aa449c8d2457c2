"""The training data: the configured set, its class count, the per-step batch order, image preparation."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from petal_fast.config import ConfigError, TrainConfig


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


def make_loader(dataset, cfg: TrainConfig, world: int, rank: int, epoch: int, start: int = 0,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """This rank's batches of ``epoch`` from step ``start`` on (the order is a function of seed and epoch)."""
    from petal_fast.data import collate_faces
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler = StepBatches(len(dataset), cfg.batch_size, world, rank, cfg.seed, epoch, start)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_faces,
                                       num_workers=cfg.data.num_workers,
                                       generator=torch.Generator().manual_seed(cfg.seed + epoch),
                                       pin_memory=pin_memory)


def prepare_images(images: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
    """[0, 1] batch → model input: resized to the backbone's size, normalised to [−1, 1] (insightface)."""
    images = images.to(device, non_blocking=True)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images.sub_(0.5).div_(0.5)
