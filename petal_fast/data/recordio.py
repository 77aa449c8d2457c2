"""insightface / MXNet RecordIO (``train.rec`` + ``train.idx``) in pure Python, reader and writer.

Record layout (dmlc-core): ``uint32 magic 0xced7230a | uint32 lrecord | payload | pad to 4 bytes``, where
``lrecord = cflag << 29 | length``. A payload that contains the magic word at a 4-byte boundary is
split there into parts (cflag 1 = first, 2 = middle, 3 = last) and the magic word itself is dropped;
the reader re-inserts it between parts. The payload of an image record is the MXNet ``IRHeader``
``<IfQQ`` (flag, label, id, id2), then ``flag`` extra float32 labels when flag > 0, then the encoded
image. Record 0 of an insightface pack is a header whose label (flag 2) is ``(first_identity_record,
end)``: image records are keys ``1 … label[0] − 1``. The ``.idx`` file holds ``key\\toffset`` lines.
"""
from __future__ import annotations

import io
import math
import os
import struct

import numpy as np
from PIL import Image

from .decode import to_rgb8

MAGIC = 0xCED7230A
_IR_HEADER = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1


class RecordIOError(ValueError):
    """A malformed, truncated or undecodable record; the message names the file and the record."""


def read_index(idx_path: str, rec_size: int | None = None) -> dict[int, int]:
    """``key\toffset`` lines → {key: byte offset}; with ``rec_size`` every offset must lie inside the .rec."""
    if not os.path.exists(idx_path):
        raise FileNotFoundError(f"RecordIO index file not found: {idx_path} (the .idx file that comes with the .rec)")
    index: dict[int, int] = {}
    with open(idx_path, encoding="ascii", errors="replace") as f:  # a binary/garbled .idx fails per line below
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            try:
                if len(parts) != 2:
                    raise ValueError
                key, offset = int(parts[0]), int(parts[1])
            except ValueError:
                raise RecordIOError(f"{idx_path}: line {lineno} is not 'key<TAB>offset': {line.rstrip()[:80]!r}") from None
            if key < 0 or offset < 0:
                raise RecordIOError(f"{idx_path}: line {lineno}: key and offset must be >= 0, got {key} and {offset}")
            if rec_size is not None and offset + 8 > rec_size:
                raise RecordIOError(f"{idx_path}: line {lineno}: record {key} points to byte {offset}, beyond the end "
                                    f"of the .rec ({rec_size} bytes): the .rec is truncated or the .idx does not belong to it")
            if key in index:
                raise RecordIOError(f"{idx_path}: line {lineno}: record {key} is indexed twice")
            index[key] = offset
    return index


def read_record(f, offset: int, path: str, key, size: int | None = None) -> bytes:
    """Read the (possibly multi-part) record that starts at ``offset`` of the open file ``f``.

    Every length read from the file is checked against its real size (``size``, measured if not
    given) before anything is read or allocated."""
    if size is None:
        size = os.fstat(f.fileno()).st_size
    f.seek(offset)
    parts = []
    pos = offset
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise RecordIOError(f"{path}: record {key} at byte {offset} is truncated (header cut off at end of file)")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{path}: record {key} at byte {offset}: bad magic 0x{magic:08x} at byte {pos} "
                                f"(expected 0x{MAGIC:08x}); the .idx does not match the .rec or the file is corrupt")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        if cflag > 3:
            raise RecordIOError(f"{path}: record {key} at byte {offset}: invalid continuation flag {cflag}")
        if pos + 8 + length > size:
            raise RecordIOError(f"{path}: record {key} at byte {offset} is truncated: its part at byte {pos} declares "
                                f"{length} bytes but the file ends {size - pos - 8} bytes later")
        data = f.read(length)
        if len(data) < length:
            raise RecordIOError(f"{path}: record {key} at byte {offset} is truncated: expected {length} bytes, got {len(data)}")
        pad = (4 - length % 4) % 4
        f.read(pad)
        pos += 8 + length + pad
        parts.append(data)
        if cflag in (0, 3):
            break
    return struct.pack("<I", MAGIC).join(parts)


def unpack_header(payload: bytes, path: str = "<bytes>", key="?") -> tuple[int, np.ndarray | float, int, int, bytes]:
    """MXNet ``IRHeader`` → (flag, label (float or float32 array when flag > 0), id, id2, rest)."""
    if len(payload) < _IR_HEADER.size:
        raise RecordIOError(f"{path}: record {key} is {len(payload)} bytes, shorter than the 24-byte image header")
    flag, label, id1, id2 = _IR_HEADER.unpack_from(payload)
    rest = payload[_IR_HEADER.size:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise RecordIOError(f"{path}: record {key} declares {flag} labels but holds only {len(rest)} bytes after the header")
        label = np.frombuffer(rest, dtype=np.float32, count=flag).copy()
        rest = rest[4 * flag:]
    return flag, label, id1, id2, rest


def decode_image(data: bytes, path: str, key) -> np.ndarray:
    """Encoded JPEG/PNG bytes → H×W×3 uint8 RGB."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return to_rgb8(im)
    except Exception as e:  # Pillow raises several types for bad data
        raise RecordIOError(f"{path}: record {key}: image failed to decode ({type(e).__name__}: {e})") from None


def _class_label(label, path: str, key) -> int:
    """The class of a record: its label (or first label), a whole number in [0, 2³¹)."""
    value = float(label if np.isscalar(label) else (label[0] if len(label) else np.nan))
    if not (math.isfinite(value) and value == int(value) and 0 <= value < 2**31):
        raise RecordIOError(f"{path}: record {key}: label {value!r} is not a class index (a whole number >= 0)")
    return int(value)


class RecordIO:
    """insightface RecordIO as a map-style data set: ``ds[i]`` → (H×W×3 uint8 RGB, int label).

    ``idx_path`` defaults to the ``.rec`` path with ``.idx``. With an insightface header record
    (record 0, flag > 0, label = (first identity record, end)) the images are keys
    ``1 … label[0] − 1`` and there are ``label[1] − label[0]`` classes; otherwise every key of the
    index is an image and ``num_classes`` is 1 + the largest label (read from the record headers on
    first use, without decoding images). The file is opened lazily per process, so the data set can
    be used by DataLoader workers. Sizes and offsets read from either file are checked against the
    real file sizes: a malformed pack raises :class:`RecordIOError` naming the file and the record.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        if not os.path.isfile(rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {rec_path}")
        self.rec_path = rec_path
        self.idx_path = idx_path or os.path.splitext(rec_path)[0] + ".idx"
        self.size = os.path.getsize(rec_path)
        self.index = read_index(self.idx_path, self.size)
        if not self.index:
            raise RecordIOError(f"{self.idx_path}: the index lists no records")
        self._file = None
        self._pid = None
        self._num_classes: int | None = None
        self.header: tuple[int, int] | None = None
        if 0 in self.index:
            flag, label, *_ = unpack_header(self.read_raw(0), rec_path, 0)
            if flag > 0:
                if len(label) < 2 or not all(math.isfinite(v) and v == int(v) for v in label[:2]):
                    raise RecordIOError(f"{rec_path}: record 0 (header): label {label.tolist()} is not "
                                        "(first identity record, end)")
                self.header = (int(label[0]), int(label[1]))
        if self.header is not None:
            first, end = self.header
            if not 1 <= first <= len(self.index) or end < first:
                raise RecordIOError(f"{rec_path}: record 0 (header) says images are records 1..{first - 1} and "
                                    f"identities {first}..{end - 1}, which does not fit the {len(self.index)} "
                                    f"records of {self.idx_path}")
            self.keys = list(range(1, first))
            missing = next((k for k in self.keys if k not in self.index), None)
            if missing is not None:
                raise RecordIOError(f"{self.idx_path}: header says images are records 1..{first - 1} but record "
                                    f"{missing} is not indexed")
            if end - first > len(self.keys):
                raise RecordIOError(f"{rec_path}: record 0 (header) declares {end - first} identities for "
                                    f"{len(self.keys)} images; the header is corrupt")
            if end > first:
                self._num_classes = end - first
        else:
            self.keys = sorted(self.index)

    @property
    def num_classes(self) -> int:
        """Classes of the pack: from the header, or 1 + the largest label over every record."""
        if self._num_classes is None:
            self._num_classes = int(self.scan_labels().max()) + 1 if len(self) else 0
        return self._num_classes

    def scan_labels(self) -> np.ndarray:
        """Every image's label, read from the record headers only (no image is decoded)."""
        return np.array([self.read_label(i) for i in range(len(self))], dtype=np.int64)

    def _handle(self):
        if self._file is None or self._pid != os.getpid():
            self._file = open(self.rec_path, "rb")
            self._pid = os.getpid()
        return self._file

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_file"] = None  # file handles do not cross process boundaries
        return state

    def read_raw(self, key: int) -> bytes:
        if key not in self.index:
            raise KeyError(f"{self.idx_path}: no record with key {key}")
        return read_record(self._handle(), self.index[key], self.rec_path, key, self.size)

    def __len__(self) -> int:
        return len(self.keys)

    def read_label(self, i: int) -> int:
        """Label of image i without decoding the image (only its header is read, when it is whole)."""
        key = self.keys[i]
        f, off = self._handle(), self.index[key]
        f.seek(off)
        head = f.read(8 + _IR_HEADER.size + 4)
        if len(head) == 8 + _IR_HEADER.size + 4:
            magic, lrec = struct.unpack_from("<II", head)
            flag = _IR_HEADER.unpack_from(head, 8)[0]
            if magic == MAGIC and lrec >> 29 == 0 and (lrec & _LEN_MASK) >= _IR_HEADER.size + 4 \
                    and off + 8 + (lrec & _LEN_MASK) <= self.size:
                label = np.frombuffer(head, np.float32, 1, 8 + _IR_HEADER.size) if flag > 0 \
                    else _IR_HEADER.unpack_from(head, 8)[1]
                return _class_label(label, self.rec_path, key)
        _, label, *_ = unpack_header(self.read_raw(key), self.rec_path, key)
        return _class_label(label, self.rec_path, key)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.rec_path} with {n} images")
        key = self.keys[int(i)]
        _, label, _, _, img = unpack_header(self.read_raw(key), self.rec_path, key)
        return decode_image(img, self.rec_path, key), _class_label(label, self.rec_path, key)


def _encode(image, fmt: str, quality: int) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def _write_record(f, payload: bytes) -> int:
    """Write one record with dmlc's magic splitting; returns its byte offset."""
    offset = f.tell()
    magic = struct.pack("<I", MAGIC)
    parts, start = [], 0
    for pos in range(0, len(payload) - 3, 4):
        if payload[pos:pos + 4] == magic:
            parts.append(payload[start:pos])
            start = pos + 4
    parts.append(payload[start:])
    for j, part in enumerate(parts):
        cflag = 0 if len(parts) == 1 else (1 if j == 0 else (3 if j == len(parts) - 1 else 2))
        f.write(struct.pack("<II", MAGIC, (cflag << 29) | len(part)))
        f.write(part)
        f.write(b"\0" * ((4 - len(part) % 4) % 4))
    return offset


def write_recordio(rec_path: str, items, idx_path: str | None = None, image_format: str = "JPEG",
                   quality: int = 95, progress: bool = False) -> int:
    """Pack (image, label) pairs as an insightface RecordIO (header record 0, images, identity records).

    ``image`` is an H×W×3 uint8 array (encoded with ``image_format`` / ``quality``) or already-encoded
    bytes; labels are ints. Returns the number of images written.
    """
    idx_path = idx_path or os.path.splitext(rec_path)[0] + ".idx"
    if progress:
        from petal_fast.progress import progress as progress_bar
        items = progress_bar(items, desc=f"packing {os.path.basename(rec_path)}", unit="img")
    offsets: dict[int, int] = {}
    ranges: dict[int, list[int]] = {}
    with open(rec_path, "wb") as f:
        f.write(b"\0" * 40)  # record 0 (8-byte record header + 32-byte payload), written once counts are known
        key, last = 0, None
        for key, (image, label) in enumerate(items, 1):
            label = int(label)
            if label in ranges and label != last:
                raise ValueError(f"write_recordio: label {label} reappears at item {key - 1}; items must be grouped by label")
            payload = _IR_HEADER.pack(0, float(label), key, 0) + _encode(image, image_format, quality)
            offsets[key] = _write_record(f, payload)
            ranges.setdefault(label, [key, key + 1])[1] = key + 1
            last = label
        n = key
        first_id = n + 1
        for j, label in enumerate(sorted(ranges)):
            lo, hi = ranges[label]
            payload = _IR_HEADER.pack(2, 0.0, first_id + j, 0) + struct.pack("<ff", lo, hi)
            offsets[first_id + j] = _write_record(f, payload)
        # Record 0: the insightface header, label (first identity record, end).
        f.seek(0)
        head = _IR_HEADER.pack(2, 0.0, 0, 0) + struct.pack("<ff", first_id, first_id + len(ranges))
        f.write(struct.pack("<II", MAGIC, len(head)) + head)
        offsets[0] = 0
    with open(idx_path, "w") as f:
        for k in sorted(offsets):
            f.write(f"{k}\t{offsets[k]}\n")
    return n
