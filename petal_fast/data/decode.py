"""Decoded images → H×W×3 uint8 RGB with their value range kept, whatever the bit depth.

Pillow's ``convert("RGB")`` clips high-depth modes instead of scaling them: a 16-bit grayscale PNG
(mode ``I;16``, 0…65535) came out 99.6 % white. Here every mode maps its full range onto 0…255:

- ``I;16*`` (16-bit grayscale PNG / TIFF): v·255/65535, rounded;
- ``I`` (32-bit integers): by the bits per sample a TIFF records, else 16 for a PNG (older Pillow
  opened 16-bit PNGs as ``I``), else 32; negative values clip to 0;
- ``F`` (32-bit float): [0, 1] data ×255; data in [0, 255] or [0, 65535] by that range; anything
  else (negative, above 65535, NaN) is an error, since no range can be told;
- every 8-bit mode (L, P, RGBA, CMYK, YCbCr, 1, LA, …): Pillow's conversion, which is exact there.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _scaled(values: np.ndarray, top: float) -> np.ndarray:
    """0…top → 0…255 uint8, rounded to nearest (float64: exact for every 32-bit integer)."""
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def _int_bits(im: Image.Image) -> int:
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None  # TIFF BitsPerSample
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    if isinstance(bits, int) and 1 <= bits <= 32:
        return bits
    return 16 if im.format == "PNG" else 32


def to_rgb8(im: Image.Image) -> np.ndarray:
    """``im`` as H×W×3 uint8 RGB, its value range mapped onto 0…255 (see the module docstring)."""
    mode = im.mode
    if mode.startswith("I;16"):
        return _gray_to_rgb(_scaled(np.asarray(im).astype(np.uint32), 65535.0))
    if mode == "I":
        return _gray_to_rgb(_scaled(np.asarray(im), float(2 ** _int_bits(im) - 1)))
    if mode == "F":
        values = np.asarray(im, dtype=np.float64)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 65535:
            raise ValueError(f"a floating-point image with values in [{lo}, {hi}]: its range cannot be told "
                             "(expected [0, 1], [0, 255] or [0, 65535])")
        top = 1.0 if hi <= 1.0 else 255.0 if hi <= 255.0 else 65535.0
        return _gray_to_rgb(_scaled(values, top))
    return np.asarray(im.convert("RGB"))
