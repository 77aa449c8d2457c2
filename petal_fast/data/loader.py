"""Image → tensor transforms, collate and DataLoader helpers shared by every face data set."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader


def to_tensor(images) -> torch.Tensor:
    """H×W×3 uint8 image, N×H×W×3 stack or list of images → float (B,3,H,W) in [0, 1]."""
    if isinstance(images, (list, tuple)):
        arrays = [np.asarray(im) for im in images]
        shapes = sorted({a.shape for a in arrays})
        if len(shapes) > 1:
            raise ValueError(f"images in one batch must share a shape, got {shapes[:4]}; resize them "
                             "(e.g. Degrade(out_size=...)) before batching")
        images = np.stack(arrays)
    arr = torch.as_tensor(np.asarray(images))
    if arr.dtype != torch.uint8 or arr.dim() not in (3, 4) or arr.shape[-1] != 3 or 0 in arr.shape[-3:-1]:
        raise ValueError(f"images must be H×W×3 or N×H×W×3 uint8 with H, W >= 1, got shape {tuple(arr.shape)} "
                         f"dtype {arr.dtype}")
    if arr.dim() == 3:
        arr = arr.unsqueeze(0)
    return arr.permute(0, 3, 1, 2).float().div_(255.0)


def collate_faces(batch) -> tuple:
    """List of (image, label, *extras) → (float (B,3,H,W) in [0,1], int64 labels, *int64/float extras)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    cols = list(zip(*batch))
    images = to_tensor(list(cols[0]))
    rest = tuple(torch.as_tensor(np.asarray(c)) for c in cols[1:])
    return (images, rest[0].long(), *rest[1:]) if rest else (images,)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker; derive numpy's seed from it so workers never share a random stream.
    np.random.seed(torch.initial_seed() % 2**32)


def make_loader(dataset, batch_size: int, shuffle: bool = True, num_workers: int = 0, seed: int = 0,
                drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a face data set with :func:`collate_faces`, seeded shuffling and workers."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_faces, generator=g, worker_init_fn=_seed_worker, drop_last=drop_last,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)
