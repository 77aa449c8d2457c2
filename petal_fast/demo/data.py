"""The demo's data: synthetic faces at two quality levels, fixed per image as in a real data set.

Quality levels, as degradations of a face rendered at the model's input size S:

- ``high``: a mild chain (down to 0.7–1.0 S, slight blur and noise, light JPEG) — gallery-like;
- ``low``:  down to 0.15–0.35 S (6–14 px at S = 40), blur, noise, JPEG — TinyFace-like probes.

Every degraded image is drawn from ``default_rng([seed, stream, i])``: the sets are the same for a
given seed whatever else runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from petal_fast.data import Degrade, SyntheticFaces

PRETRAIN_OFFSET, ADAPT_OFFSET, EVAL_OFFSET, DISTRACTOR_OFFSET = 0, 100_000, 200_000, 300_000
HIGH, LOW = 1, 0  # quality level codes


def level_degrade(level: int, size: int) -> Degrade:
    """The degradation of one quality level for faces of ``size`` pixels."""
    if level == HIGH:
        return Degrade(resolution=(round(0.7 * size), size), blur_sigma=(0.0, 0.4), noise_std=(0.0, 0.01),
                       jpeg_quality=(75, 95), jpeg_prob=0.5)
    lo, hi = max(4, round(0.15 * size)), max(5, round(0.35 * size))
    return Degrade(resolution=(lo, hi), blur_sigma=(0.0, 1.0), noise_std=(0.0, 0.03), jpeg_quality=(30, 90))


def degrade_levels(images: np.ndarray, levels: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """Image i degraded at ``levels[i]``, with its own generator ``default_rng([seed, stream, i])``."""
    size = images.shape[1]
    chains = {lv: level_degrade(lv, size) for lv in (HIGH, LOW)}
    return np.stack([chains[int(lv)](im, seed=np.random.default_rng([seed, stream, i]))
                     for i, (im, lv) in enumerate(zip(images, levels))])


class ArrayFaces:
    """An in-memory labelled face set: ``ds[i]`` → (H×W×3 uint8 image, label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


@dataclass
class EvalSets:
    """Unseen identities: an HR set (every image undegraded), a higher-quality gallery (image 0 of each
    identity at ``high``) with higher-quality distractors, low-quality probes (the other images at
    ``low``) and a mixed-quality set (every image at a level drawn per image)."""
    hr: np.ndarray
    hr_labels: np.ndarray
    gallery: np.ndarray
    gallery_labels: np.ndarray        # −1 for distractors
    lq_probes: np.ndarray
    lq_labels: np.ndarray
    mixed: np.ndarray
    mixed_labels: np.ndarray
    mixed_levels: np.ndarray
    mixed_probe: np.ndarray           # mixed images other than image 0 of each identity (the gallery's render)

    def alpha_probes(self) -> tuple[np.ndarray, np.ndarray]:
        """Probes of the α-bin protocol: the low-quality probes, then the mixed probes (images, labels)."""
        return (np.concatenate([self.lq_probes, self.mixed[self.mixed_probe]]),
                np.concatenate([self.lq_labels, self.mixed_labels[self.mixed_probe]]))


def faces(n_ids: int, n_img: int, size: int, offset: int, seed: int) -> SyntheticFaces:
    return SyntheticFaces(n_ids, n_img, size=size, seed=seed, identity_offset=offset).load()


def adaptation_set(n_ids: int, n_hq: int, n_lq: int, size: int, seed: int) -> tuple[ArrayFaces, np.ndarray]:
    """Per identity ``n_hq`` higher-quality and ``n_lq`` low-quality images; returns the set and the levels."""
    per_id = n_hq + n_lq
    src = faces(n_ids, per_id, size, ADAPT_OFFSET, seed)
    levels = np.where(np.arange(len(src)) % per_id < n_hq, HIGH, LOW)
    return ArrayFaces(degrade_levels(src.materialize(), levels, seed, 1), src.labels), levels


def eval_sets(n_ids: int, n_probes: int, n_distractors: int, size: int, seed: int,
              mixed_high_share: float = 0.3) -> EvalSets:
    per_id = 1 + n_probes
    src = faces(n_ids, per_id, size, EVAL_OFFSET, seed)
    hr, labels = src.materialize(), src.labels
    first = np.arange(len(src)) % per_id == 0
    gallery = degrade_levels(hr[first], np.full(n_ids, HIGH), seed, 2)
    dis = degrade_levels(faces(n_distractors, 1, size, DISTRACTOR_OFFSET, seed).materialize(),
                         np.full(n_distractors, HIGH), seed, 3)
    lq = degrade_levels(hr[~first], np.full(int((~first).sum()), LOW), seed, 4)
    mixed_levels = np.where(np.random.default_rng([seed, 5]).random(len(src)) < mixed_high_share, HIGH, LOW)
    mixed = degrade_levels(hr, mixed_levels, seed, 6)
    return EvalSets(hr=hr, hr_labels=labels, gallery=np.concatenate([gallery, dis]),
                    gallery_labels=np.concatenate([labels[first], np.full(n_distractors, -1)]),
                    lq_probes=lq, lq_labels=labels[~first], mixed=mixed, mixed_labels=labels,
                    mixed_levels=mixed_levels, mixed_probe=~first)
