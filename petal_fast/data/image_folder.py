"""ImageFolder face data: ``root/<identity>/<image>``, one folder per identity, sorted names → labels."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from .decode import to_rgb8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageFolderFaces:
    """Map-style data set over ``root/<identity>/*.jpg``: ``ds[i]`` → (H×W×3 uint8 RGB, int label).

    Labels are the positions of the identity folders in sorted order (``classes``). Hidden files and
    files with other extensions are ignored; an identity folder with no image is an error (it would
    silently shift every later label), and so is a root without identity folders.
    """

    def __init__(self, root: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageFolder root is not a directory: {root}")
        self.root = root
        self.classes = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
        if not self.classes:
            raise ValueError(f"ImageFolder root {root} contains no identity folders")
        exts = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            files = sorted(f for f in os.listdir(folder)
                           if not f.startswith(".") and f.lower().endswith(exts) and os.path.isfile(os.path.join(folder, f)))
            if not files:
                raise ValueError(f"identity folder {folder} holds no image with an extension in {exts}")
            self.samples.extend((os.path.join(folder, f), label) for f in files)
        self.num_classes = len(self.classes)

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.samples])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for ImageFolder {self.root} with {n} images")
        path, label = self.samples[int(i)]
        try:
            with Image.open(path) as im:
                image = to_rgb8(im)
        except Exception as e:  # Pillow raises several types for bad files
            raise ValueError(f"image {path} (item {int(i)}, identity {self.classes[label]!r}) failed to decode: "
                             f"{type(e).__name__}: {e}") from None
        return image, label
