"""Fuzzing the readers with malformed, truncated and adversarial files: every failure is a ValueError
subclass naming the file (RecordIOError, UnsafePickleError's ValueError twin, …), never another
exception, a hang or a huge allocation."""
from __future__ import annotations

import io
import pickle
import struct
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from petal_fast.data import ImageFolderFaces, RecordIO, RecordIOError, write_recordio
from petal_fast.eval import UnsafePickleError, load_bin, save_bin

MAGIC = 0xCED7230A
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _pack_bytes(tmp_path) -> tuple[bytes, str]:
    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), i // 2) for i in range(6)]
    write_recordio(str(tmp_path / "ok.rec"), items, image_format="PNG")
    return (tmp_path / "ok.rec").read_bytes(), (tmp_path / "ok.idx").read_text()


def _read_everything(rec: str, idx: str | None = None) -> None:
    """What training does with a pack: open it, count classes, read every item."""
    ds = RecordIO(rec, idx)
    _ = ds.num_classes
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.ndim == 3 and image.shape[2] == 3 and label >= 0


def _expect_clean_failure_or_success(fn, path_hint: str) -> None:
    t0 = time.perf_counter()
    try:
        fn()
    except (ValueError, FileNotFoundError) as err:  # RecordIOError / UnsafePickleError's message names the file
        assert path_hint in str(err), err
    except KeyError as err:  # an index key that is not in the pack: names the .idx file
        assert path_hint in str(err) or ".idx" in str(err), err
    assert time.perf_counter() - t0 < 10, "reader took too long: a size read from the file was trusted"


@FUZZ
@given(data=st.data())
def test_recordio_mutated_packs(tmp_path, data):
    blob, index = _pack_bytes(tmp_path)
    rec, idx = tmp_path / "f.rec", tmp_path / "f.idx"
    kind = data.draw(st.sampled_from(["flip", "truncate", "huge_length", "magic", "idx_text", "idx_offsets"]))
    b = bytearray(blob)
    idx_text = index
    if kind == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(b) - 1), min_size=1, max_size=8)):
            b[pos] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        b = b[:data.draw(st.integers(0, len(b) - 1))]
    elif kind == "huge_length":  # a record header claiming up to 512 MiB (or a bad continuation flag)
        offsets = [int(line.split("\t")[1]) for line in index.splitlines()]
        at = data.draw(st.sampled_from(offsets))
        b[at + 4:at + 8] = struct.pack("<I", data.draw(st.integers(0, 2**32 - 1)))
    elif kind == "magic":
        offsets = [int(line.split("\t")[1]) for line in index.splitlines()]
        at = data.draw(st.sampled_from(offsets))
        b[at:at + 4] = data.draw(st.binary(min_size=4, max_size=4))
    elif kind == "idx_text":
        idx_text = data.draw(st.text(max_size=200))
    else:
        lines = index.splitlines()
        j = data.draw(st.integers(0, len(lines) - 1))
        key = lines[j].split("\t")[0]
        lines[j] = f"{key}\t{data.draw(st.integers(-2**40, 2**40))}"
        idx_text = "\n".join(lines) + "\n"
    rec.write_bytes(bytes(b))
    idx.write_text(idx_text)
    _expect_clean_failure_or_success(lambda: _read_everything(str(rec)), "f.")


@FUZZ
@given(blob=st.binary(max_size=400), idx_bytes=st.binary(max_size=100))
def test_recordio_random_bytes(tmp_path, blob, idx_bytes):
    rec, idx = tmp_path / "r.rec", tmp_path / "r.idx"
    rec.write_bytes(blob)
    idx.write_bytes(idx_bytes)
    _expect_clean_failure_or_success(lambda: _read_everything(str(rec)), "r.")


def test_recordio_header_with_absurd_counts(tmp_path):
    """A header record whose (first identity, end) is huge must not build a huge key list or head."""
    for first, end in [(1e9, 1e9 + 5), (3, 1e9), (float("nan"), 4), (5, 2)]:
        payload = struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<ff", first, end)
        (tmp_path / "h.rec").write_bytes(struct.pack("<II", MAGIC, len(payload)) + payload)
        (tmp_path / "h.idx").write_text("0\t0\n")
        t0 = time.perf_counter()
        with pytest.raises(RecordIOError, match=r"h\.rec: record 0 \(header\)"):
            RecordIO(str(tmp_path / "h.rec"))
        assert time.perf_counter() - t0 < 1


def test_recordio_bad_labels_are_named(tmp_path):
    for label in (float("nan"), -1.0, 2.5, 1e30):
        payload = struct.pack("<IfQQ", 0, label, 0, 0) + b"x"
        (tmp_path / "l.rec").write_bytes(struct.pack("<II", MAGIC, len(payload)) + payload + b"\0" * 3)
        (tmp_path / "l.idx").write_text("0\t0\n")
        with pytest.raises(RecordIOError, match=r"l\.rec: record 0: label .* is not a class index"):
            RecordIO(str(tmp_path / "l.rec")).num_classes


def _bin_bytes(tmp_path, protocol: int = 4) -> bytes:
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (4, 10, 10, 3), dtype=np.uint8)
    save_bin(str(tmp_path / "ok.bin"), imgs, [True, False], image_format="PNG")
    if protocol != 4:
        bins, same = pickle.loads((tmp_path / "ok.bin").read_bytes())
        return pickle.dumps((bins, same), protocol=protocol)
    return (tmp_path / "ok.bin").read_bytes()


def _load_bin_clean(path) -> None:
    try:
        images, same = load_bin(str(path))
    except UnsafePickleError as err:  # an UnpicklingError, named separately: refused, not crashed
        assert str(path) in str(err)
        return
    assert images.shape[0] == 2 * same.shape[0]


@FUZZ
@given(data=st.data())
def test_bin_mutated_and_truncated(tmp_path, data):
    blob = bytearray(_bin_bytes(tmp_path, data.draw(st.sampled_from([2, 4, 5]))))
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    else:
        for pos in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=6)):
            blob[pos] = data.draw(st.integers(0, 255))
    path = tmp_path / "m.bin"
    path.write_bytes(bytes(blob))
    _expect_clean_failure_or_success(lambda: _load_bin_clean(path), "m.bin")


@FUZZ
@given(blob=st.binary(max_size=300))
def test_bin_random_bytes(tmp_path, blob):
    path = tmp_path / "r.bin"
    path.write_bytes(blob)
    _expect_clean_failure_or_success(lambda: _load_bin_clean(path), "r.bin")


@pytest.mark.parametrize("payload", [
    b"\x80\x04\x95" + struct.pack("<Q", 2**62) + b"N.",            # a frame of 4 EiB
    b"\x80\x03B" + struct.pack("<I", 2**31) + b"xx.",              # BINBYTES of 2 GiB
    b"\x80\x04\x8e" + struct.pack("<Q", 2**60) + b".",             # BINBYTES8
    b"\x80\x02N r" + struct.pack("<I", 2**31) + b".",              # memo index 2³¹ (a 16 GiB memo table)
    b"\x80\x02h\x05.",                                             # memo index never stored
])
def test_bin_adversarial_lengths_are_refused_quickly(tmp_path, payload):
    path = tmp_path / "a.bin"
    path.write_bytes(payload)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"a\.bin"):
        load_bin(str(path))
    assert time.perf_counter() - t0 < 1


@pytest.mark.parametrize("obj", [(None, []), ({1: b"x"}, [True]), (b"abc", [True]), ([b"x", b"y"], "yes"),
                                 ([b"x", b"y"], [[1, 2], [3]])])
def test_bin_wrong_structure(tmp_path, obj):
    path = tmp_path / "s.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(ValueError, match=r"s\.bin"):
        load_bin(str(path))


@FUZZ
@given(contents=st.lists(st.binary(max_size=64), min_size=1, max_size=4), data=st.data())
def test_image_folder_corrupt_and_empty_images(tmp_path, contents, data):
    root = tmp_path / "faces"
    for sub in root.glob("*/*"):
        sub.unlink()
    good = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8) + 7).save(good, format="PNG")
    (root / "a").mkdir(parents=True, exist_ok=True)
    (root / "a" / "0.png").write_bytes(good.getvalue())
    (root / "b").mkdir(exist_ok=True)
    for j, blob in enumerate(contents):
        ext = data.draw(st.sampled_from([".jpg", ".png", ".webp", ".bmp"]))
        (root / "b" / f"{j}{ext}").write_bytes(blob)

    def read_all():
        ds = ImageFolderFaces(str(root))
        for i in range(len(ds)):
            ds[i]
    _expect_clean_failure_or_success(read_all, str(root))


@FUZZ
@example(shape=[0, 4, 3], dtype=np.uint8, as_list=False).via("a 0-pixel image")
@example(shape=[], dtype=np.uint8, as_list=False).via("a scalar")
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=5),
       dtype=st.sampled_from([np.uint8, np.float32, np.int64, np.bool_]), as_list=st.booleans())
def test_to_tensor_refuses_what_is_not_images(shape, dtype, as_list):
    from petal_fast.data import to_tensor
    arr = np.zeros(shape, dtype=dtype)
    try:
        out = to_tensor([arr, arr] if as_list else arr)
    except ValueError as err:
        assert "images" in str(err)
        return
    assert out.dim() == 4 and out.shape[1] == 3 and out.dtype == torch.float32 and 0 <= out.min() <= out.max() <= 1


def test_worker_error_reaches_the_cli_as_one_line(tmp_path, capsys):
    """A corrupt image read in a DataLoader worker: the CLI prints the reader's message, not the worker traceback."""
    from petal_fast.cli import main
    blob, index = _pack_bytes(tmp_path)
    offsets = [int(line.split("\t")[1]) for line in index.splitlines()]
    b = bytearray(blob)
    b[offsets[3] + 8 + 24:offsets[3] + 8 + 40] = b"\0" * 16  # record 3's PNG signature and header
    (tmp_path / "w.rec").write_bytes(bytes(b))
    (tmp_path / "w.idx").write_text(index)
    code = main(["train", "mode=lora", "backbone=tiny", "batch_size=2", "max_steps=3", "progress=false",
                 "data.kind=recordio", f"data.path={tmp_path / 'w.rec'}", "data.num_workers=2",
                 f"output={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "w.rec: record 3" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
