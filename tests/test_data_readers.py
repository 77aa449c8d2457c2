"""RecordIO and ImageFolder readers: an independent writer, the format's corners, and bad inputs."""
from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from petal_fast.data import ImageFolderFaces, RecordIO, RecordIOError, make_loader, write_recordio

MAGIC = 0xCED7230A


def _jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _record(parts: list[bytes]) -> bytes:
    """dmlc record bytes written by hand: one part → cflag 0; several → 1, 2…, 3."""
    out = b""
    for j, p in enumerate(parts):
        cflag = 0 if len(parts) == 1 else (1 if j == 0 else 3 if j == len(parts) - 1 else 2)
        out += struct.pack("<II", MAGIC, (cflag << 29) | len(p)) + p + b"\0" * (-len(p) % 4)
    return out


def _write_pack(tmp_path, images, labels, array_label_at=None, split_at=None):
    """Independent insightface-style writer: header record 0, image records 1..n, identity records."""
    n, ids = len(images), sorted(set(labels))
    recs = {0: [struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<ff", n + 1, n + 1 + len(ids))]}
    for k, (img, lab) in enumerate(zip(images, labels), 1):
        if k == array_label_at:  # label stored as the first element of a float array (flag 3)
            head = struct.pack("<IfQQ", 3, 0.0, k, 0) + struct.pack("<fff", lab, 7.0, 9.0)
        else:
            head = struct.pack("<IfQQ", 0, float(lab), k, 0)
        payload = head + _jpeg(img)
        if k == split_at:  # the magic word sits at an aligned spot (a second label): dmlc splits it out
            head = struct.pack("<IfQQ", 2, 0.0, k, 0) + struct.pack("<f", lab)
            recs[k] = [head, _jpeg(img)]
        else:
            recs[k] = [payload]
    for j, lab in enumerate(ids):
        ks = [k for k, lb in enumerate(labels, 1) if lb == lab]
        recs[n + 1 + j] = [struct.pack("<IfQQ", 2, 0.0, 0, 0) + struct.pack("<ff", ks[0], ks[-1] + 1)]
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    blob, lines = b"", []
    for k in sorted(recs):
        lines.append(f"{k}\t{len(blob)}\n")
        blob += _record(recs[k])
    rec.write_bytes(blob)
    idx.write_text("".join(lines))
    return rec, idx


def _images(n: int, size: int = 24, vary: bool = True) -> list[np.ndarray]:
    return [(torch.rand(size, size + (i % 3 if vary else 0), 3) * 255).to(torch.uint8).numpy() for i in range(n)]


def test_recordio_reads_independent_pack(tmp_path):
    imgs, labels = _images(7), [0, 0, 1, 1, 1, 2, 2]
    rec, _ = _write_pack(tmp_path, imgs, labels, array_label_at=4, split_at=6)
    ds = RecordIO(str(rec))
    assert len(ds) == 7 and ds.num_classes == 3 and ds.header == (8, 11)
    for i in range(7):
        img, lab = ds[i]
        expect = np.asarray(Image.open(io.BytesIO(_jpeg(imgs[i]))).convert("RGB"))
        assert lab == labels[i] and img.dtype == np.uint8 and np.array_equal(img, expect)
        assert ds.read_label(i) == labels[i]
    # The split record came back with the magic word re-inserted between its parts.
    raw = ds.read_raw(6)
    assert raw[28:32] == struct.pack("<I", MAGIC)
    assert ds[-1][1] == 2


def test_recordio_without_header_uses_every_key(tmp_path):
    imgs = _images(3)
    rec, idx = tmp_path / "x.rec", tmp_path / "x.idx"
    blob, lines = b"", []
    for k, img in enumerate(imgs):
        lines.append(f"{k}\t{len(blob)}\n")
        blob += _record([struct.pack("<IfQQ", 0, float(5 + k), k, 0) + _jpeg(img)])
    rec.write_bytes(blob)
    idx.write_text("".join(lines))
    ds = RecordIO(str(rec), str(idx))
    assert len(ds) == 3 and ds.header is None and [ds[i][1] for i in range(3)] == [5, 6, 7]


def test_write_recordio_roundtrip_and_loader(tmp_path):
    imgs, labels = _images(6, 16, vary=False), [3, 3, 1, 1, 8, 8]
    # Item 2 is pre-encoded PNG bytes followed (after IEND, where decoders stop) by the magic word at
    # an aligned offset: the writer must split that record and the reader must restore it.
    buf = io.BytesIO()
    Image.fromarray(imgs[2]).save(buf, format="PNG")
    png = buf.getvalue() + b"\0" * (-len(buf.getvalue()) % 4)
    tricky = png + struct.pack("<I", MAGIC) + b"tail"
    items = [(tricky if i == 2 else im, lb) for i, (im, lb) in enumerate(zip(imgs, labels))]
    n = write_recordio(str(tmp_path / "p.rec"), items, image_format="PNG")
    ds = RecordIO(str(tmp_path / "p.rec"))
    assert n == 6 and len(ds) == 6 and ds.num_classes == 3
    assert all(np.array_equal(ds[i][0], imgs[i]) and ds[i][1] == labels[i] for i in range(6))
    assert ds.read_raw(3)[24:] == tricky
    f = open(tmp_path / "p.rec", "rb")
    f.seek(ds.index[3])
    assert struct.unpack("<II", f.read(8))[1] >> 29 == 1  # stored as a multi-part record
    f.close()
    x, y = next(iter(make_loader(ds, batch_size=2, shuffle=False, num_workers=2)))
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [3, 3]
    with pytest.raises(ValueError, match="grouped by label"):
        write_recordio(str(tmp_path / "q.rec"), zip(imgs, [0, 1, 0, 1, 2, 2]))


def test_recordio_missing_files(tmp_path):
    rec, idx = _write_pack(tmp_path, _images(2), [0, 1])
    with pytest.raises(FileNotFoundError, match="idx"):
        RecordIO(str(rec), str(tmp_path / "nope.idx"))
    with pytest.raises(FileNotFoundError, match="nope.rec"):
        RecordIO(str(tmp_path / "nope.rec"))


def test_recordio_truncated_record(tmp_path):
    rec, idx = _write_pack(tmp_path, _images(3), [0, 1, 2])
    offsets = [int(line.split("\t")[1]) for line in idx.read_text().splitlines()]
    data = rec.read_bytes()
    idx.write_text("".join(f"{k}\t{offsets[k]}\n" for k in range(4)))  # the records after 3 are gone
    rec.write_bytes(data[: offsets[3] + 40])  # cut record 3 inside its payload
    ds = RecordIO(str(rec))
    with pytest.raises(RecordIOError, match=r"train\.rec: record 3 .*truncated"):
        ds[2]
    rec.write_bytes(data[: offsets[3] + 4])  # cut inside the 8-byte record header
    with pytest.raises(RecordIOError, match="record 3 .*truncated"):
        RecordIO(str(rec))[2]


def test_recordio_corrupt_magic_and_bad_index(tmp_path):
    rec, idx = _write_pack(tmp_path, _images(3), [0, 1, 2])
    offsets = [int(line.split("\t")[1]) for line in idx.read_text().splitlines()]
    data = bytearray(rec.read_bytes())
    data[offsets[2]:offsets[2] + 4] = b"\xde\xad\xbe\xef"
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match="record 2 .*bad magic"):
        RecordIO(str(rec))[1]
    idx.write_text(idx.read_text() + "oops\n")
    with pytest.raises(RecordIOError, match="train.idx: line 8"):
        RecordIO(str(rec))
    idx.write_text(f"0\t0\n1\t{len(data) + 100}\n")
    with pytest.raises(RecordIOError, match="record 1 points to byte"):
        RecordIO(str(rec))


def test_recordio_undecodable_image(tmp_path):
    rec, idx = tmp_path / "b.rec", tmp_path / "b.idx"
    rec.write_bytes(_record([struct.pack("<IfQQ", 0, 1.0, 0, 0) + b"not a jpeg at all"]))
    idx.write_text("0\t0\n")
    with pytest.raises(RecordIOError, match=r"b\.rec: record 0: image failed to decode"):
        RecordIO(str(rec), str(idx))[0]


def _folder(tmp_path, spec: dict[str, int], size: int = 20):
    root = tmp_path / "faces"
    for name, n in spec.items():
        (root / name).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(_images(1, size)[0]).save(root / name / f"{j:03d}.png")
    return root


def test_image_folder_labels_and_filters(tmp_path):
    root = _folder(tmp_path, {"bob": 2, "alice": 3})
    (root / "alice" / "notes.txt").write_text("ignored")
    (root / "alice" / ".hidden.png").write_bytes(b"ignored")
    (root / "README").write_text("a file at the root is not a class")
    ds = ImageFolderFaces(str(root))
    assert ds.classes == ["alice", "bob"] and len(ds) == 5 and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    img, lab = ds[3]
    assert img.shape == (20, 20, 3) and img.dtype == np.uint8 and lab == 1
    assert np.array_equal(img, np.asarray(Image.open(root / "bob" / "000.png")))
    gray = root / "bob" / "002.png"
    Image.fromarray(np.full((5, 6), 77, np.uint8)).save(gray)  # grey image becomes RGB
    assert ImageFolderFaces(str(root))[5][0].shape == (5, 6, 3)


def test_image_folder_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderFaces(str(tmp_path / "missing"))
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(ValueError, match="no identity folders"):
        ImageFolderFaces(str(tmp_path / "empty_root"))
    root = _folder(tmp_path, {"a": 1, "b": 0})
    with pytest.raises(ValueError, match=r"identity folder .*b holds no image"):
        ImageFolderFaces(str(root))
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = ImageFolderFaces(str(root))
    with pytest.raises(ValueError, match=r"broken\.jpg \(item 1, identity 'b'\) failed to decode"):
        ds[1]
    with pytest.raises(IndexError):
        ds[2]
