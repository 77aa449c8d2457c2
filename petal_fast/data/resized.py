"""A face data set resized to one square size, so that images of any size batch together."""
from __future__ import annotations

import numpy as np
from PIL import Image


class ResizedFaces:
    """``ds[i]`` → (image resized to ``size``×``size`` (bicubic) when it is not already, label, *rest).

    RecordIO packs and ImageFolder trees may mix image sizes; a batch needs one shape."""

    def __init__(self, dataset, size: int):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.dataset, self.size = dataset, size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, *rest = self.dataset[i]
        if image.shape[:2] != (self.size, self.size):
            image = np.asarray(Image.fromarray(image).resize((self.size, self.size), Image.Resampling.BICUBIC))
        return (image, *rest)
