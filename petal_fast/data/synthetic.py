"""Procedurally drawn synthetic faces: the embedded default data set.

Identity lives in stable parameters drawn from ``default_rng([seed, identity_id])``: face shape, eye /
brow / nose / mouth geometry, skin, hair and iris colours, hair style, accessories (glasses, beard,
mole) and a fine skin texture. Each image varies by pose (yaw, pitch, roll, scale, shift),
expression (smile, open mouth, eye openness, brow raise), lighting, background and occlusion, drawn
from ``default_rng([seed, identity_id, image_index, 1])``. Identity ids are ``identity_offset + i``, so
two sets built with the same seed and non-overlapping id ranges hold disjoint identities.

Every part is a polygon in face coordinates, mapped to the image by the pose (roll, scale, shift)
and drawn with Pillow in painter's order at 2× resolution, then box-reduced (anti-aliasing). Texture, lighting and noise are applied with numpy. Pixels
depend only on (seed, identity id, image index), never on the order or batch they are rendered in.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os

import numpy as np
from PIL import Image, ImageDraw

_SKIN = np.array([[0.98, 0.85, 0.75], [0.92, 0.74, 0.60], [0.80, 0.60, 0.45], [0.62, 0.43, 0.30],
                  [0.45, 0.30, 0.20], [0.95, 0.80, 0.68]], dtype=np.float32)
_HAIR = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.10], [0.55, 0.35, 0.18], [0.85, 0.72, 0.45],
                  [0.60, 0.60, 0.62], [0.55, 0.15, 0.08], [0.20, 0.20, 0.25]], dtype=np.float32)
_IRIS = np.array([[0.25, 0.15, 0.08], [0.20, 0.40, 0.70], [0.30, 0.50, 0.30], [0.45, 0.35, 0.20],
                  [0.35, 0.35, 0.40]], dtype=np.float32)

# Identity parameters: name → (low, high) for uniform draws; categorical ones are drawn separately.
_ID_RANGES = {
    "face_w": (0.50, 0.70), "face_h": (0.66, 0.86), "face_cy": (0.02, 0.12), "chin": (-0.15, 0.15),
    "hairline": (-0.60, -0.30), "hair_vol": (1.02, 1.14),
    "eye_dx": (0.19, 0.31), "eye_y": (-0.20, -0.02), "eye_w": (0.07, 0.12), "eye_h": (0.035, 0.060),
    "brow_gap": (0.07, 0.14), "brow_t": (0.012, 0.035), "brow_tilt": (-0.35, 0.35), "brow_len": (0.8, 1.4),
    "nose_len": (0.10, 0.24), "nose_w": (0.035, 0.09),
    "mouth_y": (0.28, 0.46), "mouth_w": (0.11, 0.24), "mouth_h": (0.018, 0.045),
    "ear": (0.06, 0.12), "tex_f1": (22.0, 40.0), "tex_f2": (22.0, 40.0), "tex_p1": (0.0, 6.283),
    "tex_p2": (0.0, 6.283), "tex_amp": (0.04, 0.10), "mole_x": (-0.35, 0.35), "mole_y": (-0.05, 0.45),
}


def identity_params(seed: int, identity_id: int) -> dict:
    """The stable parameters of one identity (floats and RGB triples)."""
    rng = np.random.default_rng([int(seed), int(identity_id)])
    p = {k: float(rng.uniform(lo, hi)) for k, (lo, hi) in _ID_RANGES.items()}
    p["skin"] = np.clip(_SKIN[rng.integers(len(_SKIN))] + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32)
    p["hair"] = np.clip(_HAIR[rng.integers(len(_HAIR))] + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32)
    p["iris"] = np.clip(_IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 0.04, 3), 0, 1).astype(np.float32)
    p["lip"] = np.clip(p["skin"] * np.array([0.85, 0.55, 0.55]) + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32)
    p["hair_style"] = int(rng.integers(3))  # 0 short, 1 long, 2 bald
    p["glasses"] = int(rng.choice(3, p=[0.72, 0.2, 0.08]))  # 0 none, 1 clear frames, 2 sunglasses
    p["frame"] = rng.uniform(0.0, 0.5, 3).astype(np.float32)
    p["beard"] = float(rng.random() < 0.2)
    p["mole"] = float(rng.random() < 0.4)
    return p


def image_params(seed: int, identity_id: int, image_index: int, variation: float = 1.0) -> dict:
    """The per-image nuisance parameters (pose, expression, lighting, background, occlusion)."""
    rng = np.random.default_rng([int(seed), int(identity_id), int(image_index), 1])
    v = float(variation)
    q = {
        "yaw": rng.uniform(-0.35, 0.35) * v, "pitch": rng.uniform(-0.2, 0.2) * v, "roll": rng.uniform(-0.25, 0.25) * v,
        "scale": 1.0 + rng.uniform(-0.1, 0.1) * v, "tx": rng.uniform(-0.06, 0.06) * v, "ty": rng.uniform(-0.06, 0.06) * v,
        "smile": rng.uniform(-0.3, 1.0) * v, "mouth_open": max(0.0, rng.uniform(-0.6, 1.0)) * v,
        "eye_open": 1.0 - rng.uniform(0.0, 0.6) * v, "brow_raise": rng.uniform(-0.02, 0.04) * v,
        "bright": 1.0 + rng.uniform(-0.3, 0.2) * v, "light_x": rng.uniform(-0.3, 0.3) * v,
        "light_y": rng.uniform(-0.2, 0.2) * v, "noise": 0.01 * v,
        "bg0": 0.5 + (rng.uniform(0.05, 0.95, 3) - 0.5) * v, "bg1": 0.5 + (rng.uniform(0.05, 0.95, 3) - 0.5) * v, "bg_dir": rng.uniform(0, 2 * math.pi),
        "tint": 1.0 + rng.normal(0, 0.04, 3) * v,
        "occ": float(rng.random() < 0.25 * v), "occ_cx": rng.uniform(-0.6, 0.6), "occ_cy": rng.uniform(-0.2, 0.9),
        "occ_w": rng.uniform(0.12, 0.35), "occ_h": rng.uniform(0.10, 0.30), "occ_col": rng.uniform(0, 1, 3),
        "noise_seed": int(rng.integers(2**31 - 1)),
    }
    return q


_N_PTS = 28
_ANG = np.linspace(0.0, 2.0 * np.pi, _N_PTS, endpoint=False)
_COS, _SIN = np.cos(_ANG), np.sin(_ANG)


def _ell(cx, cy, ax, ay) -> np.ndarray:
    """Polygon (n, 2) of an axis-aligned ellipse in face coordinates (y down)."""
    return np.stack([cx + ax * _COS, cy + ay * _SIN], 1)


def _clip(poly: np.ndarray, y: float, keep_below: bool) -> np.ndarray:
    """Sutherland–Hodgman clip of a polygon by the horizontal line at ``y``."""
    inside = (poly[:, 1] >= y) if keep_below else (poly[:, 1] <= y)
    out = []
    for j in range(len(poly)):
        p, q, pin, qin = poly[j], poly[(j + 1) % len(poly)], inside[j], inside[(j + 1) % len(poly)]
        if pin:
            out.append(p)
        if pin != qin:
            t = (y - p[1]) / (q[1] - p[1])
            out.append(p + t * (q - p))
    return np.array(out).reshape(-1, 2)


def _rgba(color, alpha: float = 1.0) -> tuple:
    c = np.clip(np.asarray(color, np.float64) * 255.0 + 0.5, 0, 255).astype(int)
    return (int(c[0]), int(c[1]), int(c[2]), int(round(255 * alpha)))


class _Canvas:
    """Draws face-coordinate polygons on a supersampled RGB image and on a 1× texture mask."""

    def __init__(self, background: np.ndarray, q: dict, size: int, ss: int):
        self.size, self.ss = size, ss
        self.img = Image.fromarray(background).resize((size * ss, size * ss), Image.Resampling.NEAREST)
        self.draw = ImageDraw.Draw(self.img, "RGBA")
        self.mask = Image.new("L", (size, size), 0)
        self.mdraw = ImageDraw.Draw(self.mask)
        c, s, k = math.cos(q["roll"]), math.sin(q["roll"]), q["scale"]
        # face → image coordinates: P = t + scale·R(−roll)·X, the inverse of the face frame's rotation
        self.A, self.k = k * np.array([[c, -s], [s, c]]), k
        self.t = np.array([q["tx"], q["ty"]])

    def _px(self, poly: np.ndarray, scale: int, face: bool = True) -> list:
        p = poly @ self.A.T + self.t if face else poly
        return ((p + 1.0) * (0.5 * self.size * scale)).ravel().tolist()

    def poly(self, poly: np.ndarray, color, alpha: float = 1.0, mask: int | None = 0, face: bool = True) -> None:
        if len(poly) < 3:
            return
        self.draw.polygon(self._px(poly, self.ss, face), fill=_rgba(color, alpha))
        if mask is not None:
            self.mdraw.polygon(self._px(poly, 1, face), fill=mask)

    def line(self, pts: np.ndarray, color, width: float) -> None:
        w = max(1, int(round(width * 0.5 * self.size * self.ss * self.k)))
        self.draw.line(self._px(pts, self.ss), fill=_rgba(color), width=w, joint="curve")
        self.mdraw.line(self._px(pts, 1), fill=0, width=max(1, w // self.ss))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [−1, 1] (x right, y down)."""
    lin = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
    return tuple(np.meshgrid(lin, lin))


def render_face(p: dict, q: dict, size: int, ss: int = 2) -> np.ndarray:
    """Render one face from identity parameters ``p`` and image parameters ``q`` → size×size×3 uint8.

    Polygons are drawn at ``ss``× resolution and box-reduced (anti-aliasing); the identity's fine skin
    texture, the lighting and the sensor noise are applied at the output resolution.
    """
    X0, Y0 = _grid(size)
    t = (math.cos(q["bg_dir"]) * X0 + math.sin(q["bg_dir"]) * Y0 + 1.0) * 0.5
    bg = np.asarray(q["bg0"], np.float32) + (np.asarray(q["bg1"], np.float32) - np.asarray(q["bg0"], np.float32)) * np.clip(t, 0, 1)[..., None]
    cv = _Canvas((np.clip(bg, 0, 1) * 255 + 0.5).astype(np.uint8), q, size, ss)

    yaw, pitch = q["yaw"], q["pitch"]
    squeeze = 1.0 - 0.3 * abs(yaw)           # a turned head looks narrower
    fx, fy = yaw * 0.22, pitch * 0.25         # inner features slide towards the turn
    fw, fh, fcy = p["face_w"] * squeeze, p["face_h"], p["face_cy"]
    skin, hair = p["skin"], p["hair"]

    if p["hair_style"] == 1:  # long hair falls behind the face and neck
        cv.poly(_ell(fx * 0.3, fcy + 0.15, fw * 1.35, fh * 1.15), hair)
    neck_w = min(0.22, fw)
    cv.poly(np.array([[-neck_w, fcy], [neck_w, fcy], [neck_w, 1.6], [-neck_w, 1.6]]), skin * 0.85)
    for side in (-1.0, 1.0):
        cv.poly(_ell(side * fw * 0.98 + fx * 0.4, fcy - 0.05, p["ear"] * 0.7, p["ear"] * 1.4), skin * 0.92)
    # Face: the chin parameter widens or narrows the lower half.
    face = np.stack([fx * 0.3 + fw * (1.0 + p["chin"] * np.maximum(_SIN, 0.0)) * _COS, fcy + fh * _SIN], 1)
    cv.poly(face, skin, mask=255)
    if p["hair_style"] != 2:  # hair cap above the hairline
        cap = _ell(fx * 0.3, fcy - 0.04, fw * p["hair_vol"], fh * p["hair_vol"])
        cv.poly(_clip(cap, p["hairline"] + fy * 0.5, keep_below=False), hair)

    for side in (-1.0, 1.0):
        ex, ey = side * p["eye_dx"] * squeeze + fx, p["eye_y"] + fy
        near = 1.0 + side * yaw * 0.35        # the eye nearer the camera looks larger
        ew, eh = p["eye_w"] * near, p["eye_h"] * max(q["eye_open"], 0.1)
        brow = _ell(ex, ey - p["brow_gap"] - q["brow_raise"], ew * p["brow_len"], p["brow_t"])
        brow[:, 1] += side * p["brow_tilt"] * (brow[:, 0] - ex) * 0.5
        cv.poly(brow, hair * 0.7)
        cv.poly(_ell(ex, ey, ew, eh), (0.96, 0.96, 0.96))
        ir = p["eye_h"] * 0.85
        cv.poly(_ell(ex + yaw * 0.03, ey, ir, min(ir, eh)), p["iris"])
        cv.poly(_ell(ex + yaw * 0.03, ey, ir * 0.47, min(ir * 0.47, eh)), (0.03, 0.03, 0.03))
        if p["glasses"] == 1:
            ring = _ell(ex, ey, ew * 1.55, ew * 1.25)
            cv.line(np.vstack([ring, ring[:1]]), p["frame"], 0.018)
        elif p["glasses"] == 2:
            cv.poly(_ell(ex, ey, ew * 1.55, ew * 1.25), p["frame"] * 0.3)
    if p["glasses"]:
        inner = p["eye_dx"] * squeeze - p["eye_w"] * 1.5
        cv.line(np.array([[fx - inner, p["eye_y"] + fy - 0.01], [fx + inner, p["eye_y"] + fy - 0.01]]), p["frame"] * 0.6, 0.015)

    # Nose: a shaded ridge and a darker tip.
    nx, ny = fx * 1.15, p["eye_y"] + fy + p["nose_len"] * 0.5 + 0.04
    cv.poly(_ell(nx + 0.02, ny, p["nose_w"] * 0.5, p["nose_len"] * 0.5), skin * 0.7, alpha=0.35, mask=None)
    cv.poly(_ell(nx, ny + p["nose_len"] * 0.45, p["nose_w"], p["nose_w"] * 0.5), skin * 0.65, alpha=0.6, mask=None)

    mx, my = fx * 1.05, p["mouth_y"] + fy
    if p["beard"]:
        cv.poly(_clip(face, my - p["mouth_h"] * 2.0, keep_below=True), hair, alpha=0.85)
    # Mouth: curved by the smile (y ← y − 2·smile·(x − mx)²), opened by the expression.
    lips = _ell(mx, my, p["mouth_w"] * (1.0 + 0.15 * q["smile"]), p["mouth_h"] * (1.0 + q["mouth_open"]))
    lips[:, 1] -= q["smile"] * 2.0 * (lips[:, 0] - mx) ** 2
    cv.poly(lips, p["lip"])
    if q["mouth_open"] > 0.05:
        inner = _ell(mx, my, p["mouth_w"] * 0.8, p["mouth_h"] * q["mouth_open"] * 0.8)
        inner[:, 1] -= q["smile"] * 2.0 * (inner[:, 0] - mx) ** 2
        cv.poly(inner, (0.1, 0.1, 0.1))
    if p["mole"]:
        cv.poly(_ell(p["mole_x"] * fw + fx, p["mole_y"] + fy, 0.022, 0.022), skin * 0.35)
    if q["occ"]:  # an opaque rectangle (hand, object, mask) in image coordinates
        x0, x1 = q["occ_cx"] - q["occ_w"], q["occ_cx"] + q["occ_w"]
        y0, y1 = q["occ_cy"] - q["occ_h"], q["occ_cy"] + q["occ_h"]
        cv.poly(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), q["occ_col"], face=False)

    img = np.asarray(cv.img.reduce(ss), dtype=np.float32) * (1.0 / 255.0)
    # Fine identity texture (freckle-like pattern) on bare skin: the detail low resolution destroys.
    # It follows the face's shift and scale but not its roll, which keeps it separable (an outer product).
    lin = X0[0]
    tex = (np.sin(p["tex_f2"] * (lin - q["ty"]) / q["scale"] + p["tex_p2"])[:, None]
           * np.sin(p["tex_f1"] * (lin - q["tx"]) / q["scale"] + p["tex_p1"])[None, :])
    skin_mask = np.asarray(cv.mask, dtype=np.float32) * (p["tex_amp"] / 255.0)
    # ... times the lighting (brightness, directional gradient) in one factor, then tint and noise.
    gain = (1.0 - tex * skin_mask) * (q["bright"] * (1.0 + q["light_x"] * X0 + q["light_y"] * Y0))
    img *= gain[..., None] * np.asarray(q["tint"], np.float32)
    if q["noise"] > 0:
        img += np.random.default_rng(q["noise_seed"]).standard_normal(img.shape, dtype=np.float32) * q["noise"]
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_faces(ids: list[dict], ims: list[dict], size: int) -> np.ndarray:
    """Render one image per (identity dict, image dict) pair → (B, size, size, 3) uint8."""
    if not ids:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack([render_face(p, q, size) for p, q in zip(ids, ims)])


class SyntheticFaces:
    """Map-style data set of synthetic faces: ``ds[i]`` → (H×W×3 uint8 RGB image, label).

    Image ``i`` belongs to label ``i // images_per_identity`` (0-based within this set) whose global
    identity id is ``identity_offset + label``. Sets with the same ``seed`` and disjoint id ranges
    ``[identity_offset, identity_offset + num_identities)`` share no identity.

    ``variation`` in [0, 1] scales the per-image nuisance (0: every image of an identity identical).
    Without a cache each item is rendered on access (fast enough for DataLoader
    workers); ``load()`` keeps the whole set in memory and ``cache_dir`` stores it once as a ``.npy``
    file (memory-mapped afterwards). ``chunk`` is the unit of work of ``materialize``.
    """

    def __init__(self, num_identities: int, images_per_identity: int, size: int = 112, seed: int = 0,
                 identity_offset: int = 0, variation: float = 1.0, cache_dir: str | None = None,
                 chunk: int = 128):
        for name, val in (("num_identities", num_identities), ("images_per_identity", images_per_identity)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        if not isinstance(identity_offset, int) or identity_offset < 0:
            raise ValueError(f"identity_offset must be a non-negative int, got {identity_offset!r}")
        if not 0.0 <= float(variation) <= 1.0:
            raise ValueError(f"variation must lie in [0, 1], got {variation!r}")
        self.num_identities, self.images_per_identity = num_identities, images_per_identity
        self.size, self.seed, self.identity_offset = size, int(seed), identity_offset
        self.variation, self.chunk = float(variation), int(chunk)
        self.num_classes = num_identities
        self._array: np.ndarray | None = None
        if cache_dir is not None:
            self._array = self._load_or_build_cache(cache_dir)

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    @property
    def labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_identities), self.images_per_identity)

    @property
    def identity_ids(self) -> np.ndarray:
        """Global identity id of every image (label + identity_offset)."""
        return self.labels + self.identity_offset

    def render(self, indices) -> np.ndarray:
        """Render the given image indices → (len, size, size, 3) uint8."""
        n = len(self)
        idx = [int(i) for i in indices]
        for i in idx:
            if not 0 <= i < n:
                raise IndexError(f"index {i} out of range for SyntheticFaces of length {n}")
        ids = [identity_params(self.seed, self.identity_offset + i // self.images_per_identity) for i in idx]
        ims = [image_params(self.seed, self.identity_offset + i // self.images_per_identity,
                            i % self.images_per_identity, self.variation) for i in idx]
        return render_faces(ids, ims, self.size)

    def materialize(self, progress: bool = False, num_workers: int = 0) -> np.ndarray:
        """All images as one (N, size, size, 3) uint8 array; ``num_workers`` > 0 renders chunks in
        that many processes (the result is identical)."""
        if self._array is not None:
            return np.asarray(self._array)
        chunks = [range(s, min(s + self.chunk, len(self))) for s in range(0, len(self), self.chunk)]
        if num_workers > 0:
            from concurrent.futures import ProcessPoolExecutor

            from petal_fast.threads import single_threaded  # N workers on N cores, not N × torch's threads
            with ProcessPoolExecutor(num_workers, initializer=single_threaded) as pool:
                parts = pool.map(self.render, chunks)
                if progress:
                    from petal_fast.progress import progress as progress_bar
                    parts = progress_bar(parts, total=len(chunks), desc="synthetic faces", unit="chunk")
                return np.concatenate(list(parts))
        if progress:
            from petal_fast.progress import progress as progress_bar
            chunks = progress_bar(chunks, desc="synthetic faces", unit="chunk")
        return np.concatenate([self.render(c) for c in chunks])

    def load(self, progress: bool = False, num_workers: int = 0) -> "SyntheticFaces":
        """Render every image once and keep the array in memory (random access without re-rendering)."""
        if self._array is None:
            self._array = self.materialize(progress, num_workers)
        return self

    def _load_or_build_cache(self, cache_dir: str) -> np.ndarray:
        key = f"{self.num_identities}-{self.images_per_identity}-{self.size}-{self.seed}-{self.identity_offset}-{self.variation}"
        path = os.path.join(cache_dir, f"synthetic_faces_{hashlib.sha1(key.encode()).hexdigest()[:16]}.npy")
        if os.path.exists(path):
            arr = np.load(path, mmap_mode="r")
            if arr.shape == (len(self), self.size, self.size, 3):
                return arr
        os.makedirs(cache_dir, exist_ok=True)
        arr = self.materialize(progress=True)
        tmp = path + f".tmp{os.getpid()}.npy"
        np.save(tmp, arr)
        os.replace(tmp, path)
        return np.load(path, mmap_mode="r")

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for SyntheticFaces of length {n}")
        label = int(i) // self.images_per_identity
        if self._array is not None:
            return np.array(self._array[i]), label
        return self.render([int(i)])[0], label
