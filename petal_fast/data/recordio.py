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
import os
import struct

import numpy as np
from PIL import Image

MAGIC = 0xCED7230A
_IR_HEADER = struct.Struct("<IfQQ")
_LEN_MASK = (1 << 29) - 1


class RecordIOError(ValueError):
    """A malformed, truncated or undecodable record; the message names the file and the record."""


def read_index(idx_path: str) -> dict[int, int]:
    """``key\\toffset`` lines → {key: byte offset}."""
    if not os.path.exists(idx_path):
        raise FileNotFoundError(f"RecordIO index file not found: {idx_path} (the .idx file that comes with the .rec)")
    index: dict[int, int] = {}
    with open(idx_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            try:
                index[int(parts[0])] = int(parts[1])
            except (ValueError, IndexError):
                raise RecordIOError(f"{idx_path}: line {lineno} is not 'key<TAB>offset': {line.rstrip()!r}") from None
    return index


def read_record(f, offset: int, path: str, key) -> bytes:
    """Read the (possibly multi-part) record that starts at ``offset`` of the open file ``f``."""
    f.seek(offset)
    parts = []
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise RecordIOError(f"{path}: record {key} at byte {offset} is truncated (header cut off at end of file)")
        magic, lrec = struct.unpack("<II", head)
        if magic != MAGIC:
            raise RecordIOError(f"{path}: record {key} at byte {offset}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}); "
                                "the .idx does not match the .rec or the file is corrupt")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        data = f.read(length)
        if len(data) < length:
            raise RecordIOError(f"{path}: record {key} at byte {offset} is truncated: expected {length} bytes, got {len(data)}")
        f.read((4 - length % 4) % 4)
        parts.append(data)
        if cflag in (0, 3):
            break
        if cflag not in (1, 2):
            raise RecordIOError(f"{path}: record {key} at byte {offset}: invalid continuation flag {cflag}")
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
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # Pillow raises several types for bad data
        raise RecordIOError(f"{path}: record {key}: image failed to decode ({type(e).__name__}: {e})") from None


class RecordIO:
    """insightface RecordIO as a map-style data set: ``ds[i]`` → (H×W×3 uint8 RGB, int label).

    ``idx_path`` defaults to the ``.rec`` path with ``.idx``. With an insightface header record the
    images are keys ``1 … header.label[0] − 1`` and ``num_classes`` comes from the identity records;
    otherwise every key of the index is an image. The file is opened lazily per process, so the data
    set can be used by DataLoader workers.
    """

    def __init__(self, rec_path: str, idx_path: str | None = None):
        if not os.path.exists(rec_path):
            raise FileNotFoundError(f"RecordIO file not found: {rec_path}")
        self.rec_path = rec_path
        self.idx_path = idx_path or os.path.splitext(rec_path)[0] + ".idx"
        self.index = read_index(self.idx_path)
        self._file = None
        self._pid = None
        size = os.path.getsize(rec_path)
        for key, off in self.index.items():
            if off >= size:
                raise RecordIOError(f"{self.idx_path}: record {key} points to byte {off}, beyond the end of {rec_path} ({size} bytes)")
        self.header: tuple[int, int] | None = None
        if 0 in self.index:
            flag, label, *_ = unpack_header(self.read_raw(0), rec_path, 0)
            if flag > 0:
                self.header = (int(label[0]), int(label[1]))
        if self.header is not None:
            self.keys = list(range(1, self.header[0]))
            missing = [k for k in self.keys[:1] + self.keys[-1:] if k not in self.index]
            if missing:
                raise RecordIOError(f"{self.idx_path}: header says images are records 1..{self.header[0] - 1} but record {missing[0]} is not indexed")
            self.num_classes = self.header[1] - self.header[0]
        else:
            self.keys = sorted(self.index)
            self.num_classes = None

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
        return read_record(self._handle(), self.index[key], self.rec_path, key)

    def __len__(self) -> int:
        return len(self.keys)

    def read_label(self, i: int) -> int:
        """Label of image i without decoding the image."""
        key = self.keys[i]
        _, label, *_ = unpack_header(self.read_raw(key), self.rec_path, key)
        return int(label if np.isscalar(label) else label[0])

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {self.rec_path} with {n} images")
        key = self.keys[int(i)]
        _, label, _, _, img = unpack_header(self.read_raw(key), self.rec_path, key)
        label = label if np.isscalar(label) else label[0]
        return decode_image(img, self.rec_path, key), int(label)


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
