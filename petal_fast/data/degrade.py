"""Low-resolution degradation for training and evaluation.

    x_lr = up( JPEG_q( clip( blur_σ( down_k(x, r) ) + n ) ) ),   n ~ N(0, σ_n²)

``down_k`` resizes to r×r pixels (r drawn from 12–32 by default) with a kernel k drawn from
area / bilinear / bicubic (Pillow, antialiased), ``blur_σ`` is a Gaussian blur with σ in low-resolution
pixels, ``JPEG_q`` re-encodes at quality q with Pillow, and ``up`` resizes back to the model size
(bicubic). Every random choice comes from one generator, so an image degraded with the same seed is
bit-identical. ``Degrade.fixed(resolution)`` fixes all of them for evaluation.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

KERNELS = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class DegradeParams:
    """One draw of the degradation; ``jpeg_quality`` None means no JPEG step."""
    resolution: int
    kernel: str
    blur_sigma: float
    noise_std: float
    jpeg_quality: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def _as_range(name: str, v, lo_ok: float) -> tuple[float, float]:
    lo, hi = (v, v) if np.isscalar(v) else tuple(v)
    if not (lo_ok <= lo <= hi and np.isfinite(hi)):
        raise ValueError(f"{name} must be a number or a (low, high) pair with {lo_ok} <= low <= high, finite, got {v!r}")
    return float(lo), float(hi)


def as_generator(seed) -> np.random.Generator:
    """An int, a numpy Generator, a torch.Generator or None (fresh entropy) → numpy Generator."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=seed)))
    if seed is None or isinstance(seed, (int, np.integer)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed must be an int, numpy Generator, torch.Generator or None, got {type(seed).__name__}")


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an H×W×3 float array, σ in pixels, reflect padding."""
    if sigma < 0.05:  # the neighbours' weights are below e^-200: the identity (t / σ would overflow)
        return image
    radius = max(1, int(np.ceil(3.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    out = image
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="reflect" if out.shape[axis] > radius else "edge")
        n = out.shape[axis]
        out = sum(k[j] * np.take(p, np.arange(j, j + n), axis=axis) for j in range(len(k)))
    return out


class Degrade:
    """Random (or fixed) low-resolution degradation of H×W×3 uint8 RGB images.

    Each of ``resolution``, ``blur_sigma``, ``noise_std`` (in [0,1] intensity units) and
    ``jpeg_quality`` is a number (fixed) or a (low, high) range; ``jpeg_quality=None`` skips JPEG,
    ``jpeg_prob`` is the chance the JPEG step is applied. ``out_size`` None keeps the input size.
    """

    def __init__(self, out_size: int | None = None, resolution=(12, 32), kernels=("area", "bilinear", "bicubic"),
                 blur_sigma=(0.0, 1.0), noise_std=(0.0, 0.03), jpeg_quality=(30, 90), jpeg_prob: float = 0.8,
                 up_kernel: str = "bicubic"):
        self.resolution = tuple(int(v) for v in _as_range("resolution", resolution, 1))
        self.blur_sigma = _as_range("blur_sigma", blur_sigma, 0.0)
        self.noise_std = _as_range("noise_std", noise_std, 0.0)
        self.jpeg_quality = None if jpeg_quality is None else tuple(int(v) for v in _as_range("jpeg_quality", jpeg_quality, 1))
        if self.jpeg_quality is not None and self.jpeg_quality[1] > 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {jpeg_quality!r}")
        if not 0.0 <= jpeg_prob <= 1.0:
            raise ValueError(f"jpeg_prob must lie in [0, 1], got {jpeg_prob!r}")
        kernels = (kernels,) if isinstance(kernels, str) else tuple(kernels)
        for k in (*kernels, up_kernel):
            if k not in KERNELS:
                raise ValueError(f"unknown resize kernel {k!r}; choose from {sorted(KERNELS)}")
        if not kernels:
            raise ValueError("kernels must name at least one resize kernel")
        if out_size is not None and (not isinstance(out_size, int) or out_size < 1):
            raise ValueError(f"out_size must be a positive int or None, got {out_size!r}")
        self.kernels, self.up_kernel, self.out_size, self.jpeg_prob = kernels, up_kernel, out_size, float(jpeg_prob)

    @classmethod
    def fixed(cls, resolution: int, out_size: int | None = None, kernel: str = "bicubic", blur_sigma: float = 0.0,
              noise_std: float = 0.0, jpeg_quality: int | None = None, up_kernel: str = "bicubic") -> "Degrade":
        """The deterministic evaluation variant: every image goes through the same chain."""
        return cls(out_size=out_size, resolution=resolution, kernels=(kernel,), blur_sigma=blur_sigma,
                   noise_std=noise_std, jpeg_quality=jpeg_quality, jpeg_prob=1.0, up_kernel=up_kernel)

    def sample(self, rng: np.random.Generator) -> DegradeParams:
        r = int(rng.integers(self.resolution[0], self.resolution[1] + 1))
        k = self.kernels[int(rng.integers(len(self.kernels)))]
        sigma = float(rng.uniform(*self.blur_sigma))
        noise = float(rng.uniform(*self.noise_std))
        q = None
        if self.jpeg_quality is not None and rng.random() < self.jpeg_prob:
            q = int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1))
        return DegradeParams(r, k, sigma, noise, q)

    def apply(self, image: np.ndarray, params: DegradeParams, rng: np.random.Generator) -> np.ndarray:
        """Degrade one image with given parameters; ``rng`` draws the noise."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an H×W×3 uint8 array, got {getattr(image, 'shape', type(image))} "
                             f"{getattr(image, 'dtype', '')}")
        h, w = image.shape[:2]
        out_h, out_w = (h, w) if self.out_size is None else (self.out_size, self.out_size)
        r = params.resolution
        small = Image.fromarray(image).resize((r, r), KERNELS[params.kernel])
        x = np.asarray(small, dtype=np.float32) / 255.0
        x = gaussian_blur(x, params.blur_sigma)
        if params.noise_std > 0:
            x = x + rng.normal(0.0, params.noise_std, x.shape).astype(np.float32)
        small = Image.fromarray((np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
        if params.jpeg_quality is not None:
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=params.jpeg_quality)
            buf.seek(0)
            small = Image.open(buf).convert("RGB")
        return np.asarray(small.resize((out_w, out_h), KERNELS[self.up_kernel]))

    def __call__(self, image: np.ndarray, seed=None, return_params: bool = False):
        """Degrade an H×W×3 image (or an N×H×W×3 stack, one draw per image) with a seed or generator."""
        rng = as_generator(seed)
        if isinstance(image, np.ndarray) and image.ndim == 4:
            pairs = [self._one(im, rng) for im in image]
            out = np.stack([p[0] for p in pairs])
            return (out, [p[1] for p in pairs]) if return_params else out
        out, params = self._one(image, rng)
        return (out, params) if return_params else out

    def _one(self, image: np.ndarray, rng: np.random.Generator):
        params = self.sample(rng)
        return self.apply(image, params, rng), params


def degrade(image: np.ndarray, seed=None, **kwargs) -> np.ndarray:
    """Degrade an image (H×W×3 or N×H×W×3 uint8) once: ``Degrade(**kwargs)(image, seed)``."""
    return Degrade(**kwargs)(image, seed)


class DegradedFaces:
    """Wrap a face data set so that item i is degraded with ``default_rng([seed, epoch, i])``.

    Deterministic whatever the worker count; call ``set_epoch`` to draw new degradations.
    ``return_resolution`` adds the drawn resolution as a third item (for quality-aware training).
    """

    def __init__(self, dataset, degrade: Degrade | None = None, seed: int = 0, return_resolution: bool = False):
        self.dataset, self.degrade = dataset, degrade or Degrade()
        self.seed, self.epoch, self.return_resolution = int(seed), 0, return_resolution

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i][:2]
        rng = np.random.default_rng([self.seed, self.epoch, int(i) % len(self)])
        out, params = self.degrade(image, rng, return_params=True)
        return (out, label, params.resolution) if self.return_resolution else (out, label)
