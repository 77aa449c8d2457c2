"""insightface verification ``.bin`` pair files (LFW, CFP-FP, AgeDB-30, …), read safely.

A ``.bin`` is a pickle of ``(bins, issame_list)``: ``bins`` holds 2·P encoded images (JPEG/PNG bytes;
Python-2 packs store them as ``str``, hence insightface's ``pickle.load(f, encoding='bytes')``; some
packs hold uint8 numpy arrays of the encoded bytes), ``issame_list`` P booleans (a list or a numpy
array). Pair p is images 2p and 2p+1.

Pickles can run code, so the file is read by an unpickler that resolves only the globals this format
needs: numpy's array and scalar reconstruction, protocols 2–5 (object dtype refused), and ``_codecs.encode`` with
latin-1 (how protocol-2 pickles written by Python 3 store ``bytes``). Anything else is refused.
Before unpickling, every length the pickle declares (byte strings, frames) is checked against the
file's real size, so a corrupt or crafted length is an error, never a huge allocation.
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
import pickletools

import numpy as np
from PIL import Image

from ..data.decode import to_rgb8


class UnsafePickleError(pickle.UnpicklingError):
    """The file asks the unpickler for a global outside the ``.bin`` format's allowlist."""


def _safe_dtype(*args, **kwargs):
    dt = np.dtype(*args, **kwargs)
    if dt.hasobject:
        raise UnsafePickleError(f"refusing numpy dtype {dt!r}: object arrays can hold arbitrary pickled objects")
    return dt


def _latin1_encode(text, encoding="latin1", *rest):
    if encoding not in ("latin1", "latin-1") or rest or not isinstance(text, str):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _frombuffer(buf, dtype, shape, order):
    """numpy's protocol-5 array reconstruction (``pickle`` protocol 5 is Python 3.14's default)."""
    return np.frombuffer(buf, dtype=_safe_dtype(dtype)).reshape(shape, order=order)


def _numpy_global(name: str):
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return getattr(multiarray, name)


_ALLOWED = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _safe_dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global("_reconstruct"),
    ("numpy.core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy._core.multiarray", "scalar"): lambda: _numpy_global("scalar"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): lambda: _frombuffer,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a verification ``.bin`` uses."""

    def __init__(self, file, path: str = "<stream>"):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise UnsafePickleError(f"{self.path}: refusing to unpickle global {module}.{name}; a verification .bin "
                                    "holds only image bytes and booleans (crafted or not a .bin file)")
        return factory()


def _as_bytes(item, path: str, i: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise ValueError(f"{path}: image {i} is a {type(item).__name__}, expected encoded image bytes")


def _check_lengths(data: bytes, path: str) -> None:
    """Walk the pickle's opcodes without building anything: every declared length (bytes, strings,
    frames) must fit in the file; a truncated or corrupt stream is named with its byte offset."""
    size = len(data)
    memo = 0  # picklers number memo entries 0, 1, 2, …: a larger index would make the unpickler grow its memo
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            if op.name == "FRAME" and arg > size - pos:
                raise ValueError(f"frame at byte {pos} declares {arg} bytes but the file has {size - pos - 9} left")
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if arg > memo:
                    raise ValueError(f"memo index {arg} at byte {pos} skips ahead of the {memo} entries stored so far")
                memo = max(memo, arg + 1)
            elif op.name == "MEMOIZE":
                memo += 1
            elif op.name in ("GET", "BINGET", "LONG_BINGET") and arg >= memo:
                raise ValueError(f"memo index {arg} at byte {pos} was never stored")
    except ValueError as e:  # pickletools reports short reads ("expected n bytes ... only m remain") as ValueError
        raise ValueError(f"{path}: not a readable verification .bin pickle ({size} bytes): {e}") from None
    except Exception as e:  # noqa: BLE001 - any other malformed-stream error
        raise ValueError(f"{path}: not a readable verification .bin pickle ({type(e).__name__}: {e})") from None


def load_bin(path: str, image_size: int | tuple[int, int] | None = None,
             progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a verification ``.bin`` → (images (2P, H, W, 3) uint8 RGB, issame (P,) bool).

    ``image_size`` resizes every image (bilinear) to that square size or (H, W); without it all
    images must share one size.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"verification .bin not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    _check_lengths(data, path)
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), path).load()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable verification .bin pickle ({type(e).__name__}: {e})") from None
    if not (isinstance(obj, tuple) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple, np.ndarray)):
        raise ValueError(f"{path}: bins must be a list of encoded images, got {type(bins).__name__}")
    try:
        issame = np.asarray(issame)
    except Exception as e:  # ragged or odd objects
        raise ValueError(f"{path}: issame_list is not a list of booleans ({type(e).__name__}: {e})") from None
    if issame.ndim != 1 or issame.dtype.kind not in "bi":
        raise ValueError(f"{path}: issame_list must be a 1-D list of booleans, got shape {issame.shape} dtype {issame.dtype}")
    issame = issame.astype(bool)
    if len(bins) < 2 * len(issame):
        raise ValueError(f"{path}: {len(issame)} pairs need {2 * len(issame)} images but the file holds {len(bins)}")
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    if size is not None:  # every image is decoded into memory at that size: refuse what cannot fit first
        from petal_fast.memory import check_fits
        n = 2 * len(issame)
        check_fits({f"{n:,} images at {size[0]}×{size[1]}": n * size[0] * size[1] * 3}, f"decoding {path}",
                   "lower --image-size")
    images = []
    indices = range(2 * len(issame))
    if progress:
        from petal_fast.progress import progress
        indices = progress(indices, desc=f"decoding {os.path.basename(path)}", unit="img")
    for i in indices:
        data = _as_bytes(bins[i], path, i)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = Image.fromarray(to_rgb8(im))
                if size is not None and im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                images.append(np.asarray(im))
        except Exception as e:  # Pillow raises several types for bad data
            raise ValueError(f"{path}: image {i} (pair {i // 2}) failed to decode ({type(e).__name__}: {e})") from None
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{path}: image {i} is {images[-1].shape[:2]} but image 0 is {images[0].shape[:2]}; pass image_size")
    return np.stack(images) if images else np.zeros((0, 0, 0, 3), np.uint8), issame


def save_bin(path: str, images, issame, image_format: str = "JPEG", quality: int = 95) -> None:
    """Write (2P images, P booleans) as an insightface-style ``.bin`` (encoded bytes, protocol 4)."""
    issame = [bool(v) for v in issame]
    if len(images) != 2 * len(issame):
        raise ValueError(f"save_bin: {len(issame)} pairs need {2 * len(issame)} images, got {len(images)}")
    bins = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(im, dtype=np.uint8)).save(buf, format=image_format, quality=quality)
        bins.append(buf.getvalue())
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
