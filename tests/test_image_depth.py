"""High-depth images keep their value range (issue 27, item 7): a 16-bit grayscale PNG in an ImageFolder
read as 99.6 % white (Pillow's convert("RGB") clips I;16 instead of scaling it). Every reader decodes
through petal_fast.data.decode.to_rgb8; property-based over random images of every depth."""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from petal_fast.data import ImageFolderFaces
from petal_fast.data.decode import to_rgb8
from petal_fast.data.recordio import decode_image
from petal_fast.eval import load_bin

SHAPES = st.tuples(st.integers(1, 12), st.integers(1, 12))
PROPS = settings(max_examples=60, deadline=None)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return to_rgb8(im)


def _expect(values: np.ndarray, top: float) -> np.ndarray:
    gray = np.clip(np.rint(values.astype(np.float64) * 255.0 / top), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


@PROPS
@given(a=hnp.arrays(np.uint16, SHAPES), fmt=st.sampled_from(["PNG", "TIFF"]))
def test_16_bit_grayscale_is_scaled_not_clipped(a, fmt):
    data = _encode(Image.fromarray(a), fmt)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode.startswith("I;16")
    got = _decoded(data)
    assert got.dtype == np.uint8 and np.array_equal(got, _expect(a, 65535.0))


@PROPS
@given(a=hnp.arrays(np.int32, SHAPES, elements=st.integers(-5, 2**31 - 1)))
def test_32_bit_integer_tiff_uses_its_bits_per_sample(a):
    got = _decoded(_encode(Image.fromarray(a, mode="I"), "TIFF"))
    assert np.array_equal(got, _expect(np.maximum(a, 0), 2.0 ** 32 - 1))


@PROPS
@given(a=hnp.arrays(np.float32, SHAPES, elements=st.floats(0, 1, width=32)),
       top=st.sampled_from([1.0, 255.0, 65535.0]))
def test_float_tiff_in_a_known_range(a, top):
    scaled = (a * top).astype(np.float32)
    if top > 1 and scaled.max() <= (1.0 if top == 255.0 else 255.0):
        return  # data that fits the smaller range is read as that range: nothing to tell them apart
    got = _decoded(_encode(Image.fromarray(scaled, mode="F"), "TIFF"))
    assert np.abs(got.astype(int) - _expect(scaled, top).astype(int)).max() <= 1


@pytest.mark.parametrize("bad", [np.nan, -1.0, 1e6])
def test_float_tiff_without_a_range_is_an_error(bad):
    a = np.full((3, 3), 0.5, np.float32)
    a[1, 1] = bad
    with pytest.raises(ValueError, match="its range cannot be told"):
        _decoded(_encode(Image.fromarray(a, mode="F"), "TIFF"))


@PROPS
@given(a=hnp.arrays(np.uint8, st.tuples(st.integers(1, 10), st.integers(1, 10), st.sampled_from([1, 3, 4]))))
def test_8_bit_images_unchanged(a):
    image = Image.fromarray(a[:, :, 0]) if a.shape[2] == 1 else Image.fromarray(a)
    got = _decoded(_encode(image, "PNG"))
    assert np.array_equal(got, np.asarray(image.convert("RGB")))


def test_imagefolder_recordio_and_bin_read_16_bit_pngs(tmp_path):
    """The issue's case: a 16-bit grayscale face of mid-grey reads as mid-grey everywhere, not white."""
    a = np.full((20, 20), 30000, np.uint16)
    a[5:15, 5:15] = 12000
    data = _encode(Image.fromarray(a), "PNG")
    expect = _expect(a, 65535.0)
    for ident in ("x", "y"):
        (tmp_path / "faces" / ident).mkdir(parents=True)
        (tmp_path / "faces" / ident / "0.png").write_bytes(data)
    image, _ = ImageFolderFaces(str(tmp_path / "faces"))[0]
    assert np.array_equal(image, expect) and (image == 255).mean() == 0
    assert np.array_equal(decode_image(data, "pack.rec", 0), expect)
    with open(tmp_path / "pairs.bin", "wb") as f:
        pickle.dump(([data, data], [True]), f, protocol=4)
    images, _ = load_bin(str(tmp_path / "pairs.bin"))
    assert np.array_equal(images[0], expect)
