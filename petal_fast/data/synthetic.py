"""Procedurally drawn synthetic faces: the embedded default data set.

Identity lives in stable parameters drawn from ``default_rng([seed, identity_id])``: face shape, eye /
brow / nose / mouth geometry, skin, hair and iris colours, hair style, accessories (glasses, beard,
mole) and a fine skin texture. Each image varies by pose (yaw, pitch, roll, scale, shift),
expression (smile, open mouth, eye openness, brow raise), lighting, background and occlusion, drawn
from ``default_rng([seed, identity_id, image_index, 1])``. Identity ids are ``identity_offset + i``, so
two sets built with the same seed and non-overlapping id ranges hold disjoint identities.

Rendering is vectorised over a batch of images in torch: every part is an anti-aliased soft ellipse
(coverage ``clamp(0.5 − signed_distance / pixel, 0, 1)``) alpha-composited in painter's order. Pixels
depend only on (seed, identity id, image index), never on the batch they were rendered in.
"""
from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict

import numpy as np
import torch

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


def _stack(dicts: list[dict], key: str) -> torch.Tensor:
    """(B,1,1) for scalars, (B,3,1,1) for RGB triples."""
    vals = np.asarray([d[key] for d in dicts], dtype=np.float32)
    t = torch.from_numpy(vals)
    return t.view(-1, 3, 1, 1) if t.dim() == 2 else t.view(-1, 1, 1)


def _ellipse(X, Y, cx, cy, ax, ay, px: float) -> torch.Tensor:
    """Anti-aliased coverage of an axis-aligned ellipse; signed distance ≈ (ρ − 1)·min(ax, ay)."""
    rho = torch.sqrt(((X - cx) / ax) ** 2 + ((Y - cy) / ay) ** 2)
    return ((1.0 - rho) * torch.minimum(ax, ay) / px + 0.5).clamp_(0.0, 1.0)


def _paint(img: torch.Tensor, cover: torch.Tensor, color: torch.Tensor) -> None:
    """img ← img + cover·(color − img), in place; cover (B,H,W), color (B,3,1,1)."""
    img.add_(cover.unsqueeze(1) * (color - img))


def render_faces(ids: list[dict], ims: list[dict], size: int) -> np.ndarray:
    """Render a batch: one identity dict and one image dict per image → (B,size,size,3) uint8."""
    B = len(ids)
    px = 2.0 / size
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) * px - 1.0
    Y0, X0 = torch.meshgrid(lin, lin, indexing="ij")
    X0, Y0 = X0.unsqueeze(0), Y0.unsqueeze(0)
    I = {k: _stack(ids, k) for k in ids[0] if k not in ("hair_style", "glasses")}
    Q = {k: _stack(ims, k) for k in ims[0] if k != "noise_seed"}
    style = torch.tensor([d["hair_style"] for d in ids]).view(-1, 1, 1)
    glasses = torch.tensor([d["glasses"] for d in ids]).view(-1, 1, 1)

    # Background: a linear gradient between two colours along a random direction.
    t = (torch.cos(Q["bg_dir"]) * X0 + torch.sin(Q["bg_dir"]) * Y0 + 1.0) * 0.5
    img = Q["bg0"] + (Q["bg1"] - Q["bg0"]) * t.unsqueeze(1).clamp(0, 1)

    # Face coordinates: shift, roll, scale (the face frame moves; the background does not).
    c, s = torch.cos(Q["roll"]), torch.sin(Q["roll"])
    Xs, Ys = X0 - Q["tx"], Y0 - Q["ty"]
    X = (c * Xs + s * Ys) / Q["scale"]
    Y = (-s * Xs + c * Ys) / Q["scale"]
    yaw, pitch = Q["yaw"], Q["pitch"]
    squeeze = 1.0 - 0.3 * yaw.abs()            # a turned head looks narrower
    fx = yaw * 0.22                            # inner features slide towards the turn
    fy = pitch * 0.25
    fw = I["face_w"] * squeeze
    fcy = I["face_cy"]

    long_hair = (style == 1).float()
    has_hair = (style != 2).float()
    # Long hair falls behind the face and neck.
    _paint(img, long_hair * _ellipse(X, Y, fx * 0.3, fcy + 0.15, fw * 1.35, I["face_h"] * 1.15, px), I["hair"])
    _paint(img, ((0.22 - X.abs()) / px).clamp(0, 1) * ((Y - fcy) / px).clamp(0, 1) * (X.abs() < fw).float(), I["skin"] * 0.85)
    for side in (-1.0, 1.0):
        ear_x = side * fw * 0.98 + fx * 0.4
        _paint(img, _ellipse(X, Y, ear_x, fcy - 0.05, I["ear"] * 0.7, I["ear"] * 1.4, px), I["skin"] * 0.92)
    # Face: the chin parameter widens or narrows the lower half.
    fw_y = fw * (1.0 + I["chin"] * (Y - fcy).clamp(min=0) / I["face_h"])
    _paint(img, _ellipse(X, Y, fx * 0.3, fcy, fw_y, I["face_h"], px), I["skin"])
    face_mask = _ellipse(X, Y, fx * 0.3, fcy, fw_y, I["face_h"], px)
    # Hair cap above the hairline.
    cap = _ellipse(X, Y, fx * 0.3, fcy - 0.04, fw * I["hair_vol"], I["face_h"] * I["hair_vol"], px)
    cap = cap * ((I["hairline"] + fy * 0.5 + 0.04 * X.abs() - Y) / px).clamp(0, 1)
    _paint(img, has_hair * cap, I["hair"])
    # Fine identity texture (freckle-like pattern): the detail that low resolution destroys.
    tex = torch.sin(I["tex_f1"] * X + I["tex_p1"]) * torch.sin(I["tex_f2"] * Y + I["tex_p2"])
    img.mul_(1.0 - (I["tex_amp"] * tex * face_mask * (1.0 - cap)).unsqueeze(1))

    for side in (-1.0, 1.0):
        ex = side * I["eye_dx"] * squeeze + fx
        ey = I["eye_y"] + fy
        near = 1.0 + side * yaw * 0.35      # the eye nearer the camera looks larger
        ew, eh = I["eye_w"] * near, I["eye_h"] * Q["eye_open"].clamp(min=0.1)
        # Brow: a thin tilted ellipse above the eye.
        by = ey - I["brow_gap"] - Q["brow_raise"] + side * I["brow_tilt"] * (X - ex) * 0.5
        brow = _ellipse(X, Y - by + ey, ex, ey, ew * I["brow_len"], I["brow_t"], px)
        _paint(img, brow, I["hair"] * 0.7)
        sclera = _ellipse(X, Y, ex, ey, ew, eh, px)
        _paint(img, sclera, torch.full_like(I["skin"], 0.96))
        iris = _ellipse(X, Y, ex + yaw * 0.03, ey, I["eye_h"] * 0.85, I["eye_h"] * 0.85, px) * sclera
        _paint(img, iris, I["iris"])
        _paint(img, _ellipse(X, Y, ex + yaw * 0.03, ey, I["eye_h"] * 0.4, I["eye_h"] * 0.4, px) * sclera, torch.full_like(I["skin"], 0.03))
        # Glasses: a ring (clear frames) or a filled dark lens (sunglasses).
        r_out = _ellipse(X, Y, ex, ey, ew * 1.55, ew * 1.25, px)
        r_in = _ellipse(X, Y, ex, ey, ew * 1.55 - 0.018, ew * 1.25 - 0.018, px)
        _paint(img, (glasses == 1).float() * (r_out - r_in).clamp(0, 1), I["frame"])
        _paint(img, (glasses == 2).float() * r_out, I["frame"] * 0.3)
    bridge = _ellipse(X, Y, fx, I["eye_y"] + fy - 0.01, (I["eye_dx"] * squeeze - I["eye_w"] * 1.4).clamp(min=0.01), torch.full_like(fx, 0.012), px)
    _paint(img, (glasses > 0).float() * bridge, I["frame"] * 0.6)

    # Nose: a shaded ridge and a darker tip.
    nx, ny = fx * 1.15, I["eye_y"] + fy + I["nose_len"] * 0.5 + 0.04
    _paint(img, 0.35 * _ellipse(X, Y, nx + 0.02, ny, I["nose_w"] * 0.5, I["nose_len"] * 0.5, px), I["skin"] * 0.7)
    _paint(img, 0.6 * _ellipse(X, Y, nx, ny + I["nose_len"] * 0.45, I["nose_w"], I["nose_w"] * 0.5, px), I["skin"] * 0.65)

    # Mouth: curved by the smile, opened by the expression.
    mx, my = fx * 1.05, I["mouth_y"] + fy
    Ym = Y + Q["smile"] * 2.0 * (X - mx) ** 2
    _paint(img, _ellipse(X, Ym, mx, my, I["mouth_w"] * (1.0 + 0.15 * Q["smile"]), I["mouth_h"] * (1.0 + Q["mouth_open"]), px), I["lip"])
    # Sub-pixel ellipses smear along their long axis under the distance approximation: draw the open
    # mouth only when it is at least a pixel high.
    inner_h = I["mouth_h"] * Q["mouth_open"] * 0.8
    _paint(img, (inner_h > 0.5 * px).float() * _ellipse(X, Ym, mx, my, I["mouth_w"] * 0.8, inner_h.clamp(min=0.5 * px), px), torch.full_like(I["lip"], 0.1))

    # Beard and mole.
    beard = face_mask * ((Y - (my - I["mouth_h"] * 2.0)) / px).clamp(0, 1) * (1.0 - _ellipse(X, Ym, mx, my, I["mouth_w"] * 1.1, I["mouth_h"] * 1.6 * (1.0 + Q["mouth_open"]), px))
    _paint(img, 0.85 * I["beard"] * beard, I["hair"])
    _paint(img, I["mole"] * _ellipse(X, Y, I["mole_x"] * fw + fx, I["mole_y"] + fy, torch.full_like(fx, 0.022), torch.full_like(fx, 0.022), px), I["skin"] * 0.35)

    # Occlusion: an opaque rectangle (hand, object, mask), in image coordinates.
    rect = ((Q["occ_w"] - (X0 - Q["occ_cx"]).abs()) / px).clamp(0, 1) * ((Q["occ_h"] - (Y0 - Q["occ_cy"]).abs()) / px).clamp(0, 1)
    _paint(img, Q["occ"] * rect, Q["occ_col"])

    # Lighting: brightness, a directional gradient and a colour tint.
    light = (Q["bright"] * (1.0 + Q["light_x"] * X0 + Q["light_y"] * Y0)).unsqueeze(1)
    img.mul_(light * Q["tint"])
    noise = torch.cat([torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(d["noise_seed"])) for d in ims])
    img.add_(noise * Q["noise"].unsqueeze(1))
    out = (img.clamp_(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


class SyntheticFaces:
    """Map-style data set of synthetic faces: ``ds[i]`` → (H×W×3 uint8 RGB image, label).

    Image ``i`` belongs to label ``i // images_per_identity`` (0-based within this set) whose global
    identity id is ``identity_offset + label``. Sets with the same ``seed`` and disjoint id ranges
    ``[identity_offset, identity_offset + num_identities)`` share no identity.

    ``variation`` in [0, 1] scales the per-image nuisance (0: every image of an identity identical).
    Images are rendered in chunks of ``chunk`` and the last few chunks are kept in memory;
    ``cache_dir`` stores the whole set once as a ``.npy`` file (memory-mapped afterwards).
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
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
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
        if not idx:
            return np.zeros((0, self.size, self.size, 3), np.uint8)
        # Sub-batches of 16 keep the working set in cache, and one intra-op thread: on a busy 2-core
        # machine torch's thread pool made these small element-wise ops 10-30x slower.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return np.concatenate([render_faces(ids[s:s + 16], ims[s:s + 16], self.size) for s in range(0, len(idx), 16)])
        finally:
            torch.set_num_threads(threads)

    def materialize(self, progress: bool = False) -> np.ndarray:
        """All images as one (N, size, size, 3) uint8 array."""
        if self._array is not None:
            return np.asarray(self._array)
        starts = range(0, len(self), self.chunk)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="synthetic faces", unit="chunk")
        return np.concatenate([self.render(range(s, min(s + self.chunk, len(self)))) for s in starts])

    def load(self, progress: bool = False) -> "SyntheticFaces":
        """Render every image once and keep the array in memory (random access without re-rendering)."""
        if self._array is None:
            self._array = self.materialize(progress)
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
        c = int(i) // self.chunk
        if c not in self._chunks:
            lo = c * self.chunk
            self._chunks[c] = self.render(range(lo, min(lo + self.chunk, n)))
            if len(self._chunks) > 4:
                self._chunks.popitem(last=False)
        return self._chunks[c][int(i) - c * self.chunk].copy(), label
