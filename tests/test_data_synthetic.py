"""Synthetic faces and the low-resolution degradation: determinism, identity structure, lost detail."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from petal_fast.data import Degrade, DegradedFaces, SyntheticFaces, degrade, make_loader, to_tensor


def _features(images: np.ndarray) -> np.ndarray:
    """Standardised grey-level pixels: the 'simple pixel distance' feature."""
    g = images.astype(np.float32).mean(-1)
    g = (g - g.mean((1, 2), keepdims=True)) / (g.std((1, 2), keepdims=True) + 1e-6)
    return g.reshape(len(g), -1)


def _hf_energy(images: np.ndarray) -> float:
    """Mean squared discrete Laplacian of the grey image: energy at the highest frequencies."""
    g = images.astype(np.float64).mean(-1)
    lap = 4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    return float((lap ** 2).mean())


def test_synthetic_deterministic_and_batch_independent():
    seed = int(torch.randint(0, 1000, (1,)))
    a = SyntheticFaces(3, 4, 48, seed=seed)
    b = SyntheticFaces(3, 4, 48, seed=seed)
    full = a.materialize()
    assert full.shape == (12, 48, 48, 3) and full.dtype == np.uint8
    assert np.array_equal(full, b.materialize())
    assert np.array_equal(a[7][0], full[7]) and a[7][1] == 1
    assert np.array_equal(a.render([5]), full[5:6])  # pixels do not depend on the batch
    assert np.array_equal(SyntheticFaces(3, 4, 48, seed=seed, chunk=5).materialize(num_workers=2), full)
    assert not np.array_equal(full, SyntheticFaces(3, 4, 48, seed=seed + 1).materialize())


def test_identity_offset_gives_the_same_identities_disjointly():
    whole = SyntheticFaces(6, 2, 40, seed=5)
    tail = SyntheticFaces(3, 2, 40, seed=5, identity_offset=3)
    head = SyntheticFaces(3, 2, 40, seed=5)
    assert np.array_equal(tail.materialize(), whole.materialize()[6:])
    assert set(head.identity_ids).isdisjoint(tail.identity_ids)
    assert list(tail.labels) == [0, 0, 1, 1, 2, 2]


def test_identities_stable_across_images_and_distinct_across_identities():
    n_id, per = 16, 5
    ds = SyntheticFaces(n_id, per, 64, seed=int(torch.randint(0, 10_000, (1,))))
    F, y = _features(ds.materialize()), ds.labels
    D = ((F[:, None] - F[None]) ** 2).mean(-1)
    same = (y[:, None] == y[None]) & ~np.eye(len(y), dtype=bool)
    diff = y[:, None] != y[None]
    assert D[same].mean() < 0.8 * D[diff].mean()
    # Leave-one-out nearest class centroid on raw pixels: far above chance (1/16).
    hits = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        C = np.stack([F[keep & (y == c)].mean(0) for c in range(n_id)])
        hits += int(np.argmin(((C - F[i]) ** 2).sum(1)) == y[i])
    assert hits / len(y) > 4.0 / n_id
    # Without nuisance variation every image of an identity is the same picture.
    still = SyntheticFaces(2, 3, 32, seed=1, variation=0.0).materialize()
    assert np.array_equal(still[0], still[2]) and not np.array_equal(still[0], still[3])


def test_degrade_deterministic_by_seed_and_removes_detail():
    faces = SyntheticFaces(4, 2, 96, seed=int(torch.randint(0, 1000, (1,)))).materialize()
    d = Degrade(out_size=96)
    out1, params = d(faces, 11, return_params=True)
    out2 = d(faces, np.random.default_rng(11))
    assert np.array_equal(out1, out2) and out1.shape == faces.shape
    assert all(12 <= p.resolution <= 32 and p.kernel in ("area", "bilinear", "bicubic") for p in params)
    assert not np.array_equal(out1, d(faces, 12))
    g = torch.Generator().manual_seed(3)
    assert np.array_equal(d(faces[0], g), d(faces[0], torch.Generator().manual_seed(3)))
    # Detail really vanishes: high-frequency energy falls by an order of magnitude at 16 px.
    lr = Degrade.fixed(16, out_size=96)(faces)
    assert _hf_energy(lr) < 0.1 * _hf_energy(faces)
    assert _hf_energy(out1) < 0.5 * _hf_energy(faces)
    # ... while the coarse content (mean colour) stays.
    assert np.abs(lr.astype(float).mean((1, 2)) - faces.astype(float).mean((1, 2))).max() < 8.0


def test_degrade_fixed_and_function_form():
    face = SyntheticFaces(1, 1, 64, seed=2)[0][0]
    fixed = Degrade.fixed(20, out_size=112, kernel="area", jpeg_quality=50)
    a, p = fixed(face, 0, return_params=True)
    assert a.shape == (112, 112, 3) and p.resolution == 20 and p.jpeg_quality == 50 and p.noise_std == 0.0
    assert np.array_equal(a, fixed(face, 999))  # no randomness left
    assert np.array_equal(degrade(face, seed=4, out_size=64), Degrade(out_size=64)(face, 4))


@pytest.mark.parametrize("kwargs", [dict(resolution=(20, 10)), dict(kernels=("lanczos9",)), dict(jpeg_quality=(50, 120)),
                                    dict(blur_sigma=-1.0), dict(jpeg_prob=2.0), dict(out_size=0), dict(kernels=())])
def test_degrade_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Degrade(**kwargs)


def test_degrade_bad_image_and_seed():
    d = Degrade()
    with pytest.raises(ValueError, match="uint8"):
        d(np.zeros((8, 8, 3), np.float32), 0)
    with pytest.raises(TypeError, match="seed"):
        d(np.zeros((8, 8, 3), np.uint8), "abc")


def test_synthetic_bad_arguments():
    for kwargs in (dict(num_identities=0, images_per_identity=1), dict(num_identities=2, images_per_identity=1, size=8),
                   dict(num_identities=2, images_per_identity=1, identity_offset=-1),
                   dict(num_identities=2, images_per_identity=1, variation=1.5)):
        with pytest.raises(ValueError):
            SyntheticFaces(**kwargs)
    ds = SyntheticFaces(2, 2, 32)
    with pytest.raises(IndexError):
        ds[4]
    assert np.array_equal(ds[-1][0], ds[3][0])


def test_cache_dir_roundtrip(tmp_path):
    a = SyntheticFaces(2, 3, 32, seed=9, cache_dir=str(tmp_path))
    b = SyntheticFaces(2, 3, 32, seed=9, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.npy"))) == 1
    assert np.array_equal(a.materialize(), SyntheticFaces(2, 3, 32, seed=9).materialize())
    assert np.array_equal(b[4][0], a[4][0])


def test_loader_with_workers_matches_direct_indexing():
    ds = DegradedFaces(SyntheticFaces(3, 2, 32, seed=1), Degrade(out_size=32), seed=4, return_resolution=True)
    x, y, r = next(iter(make_loader(ds, batch_size=6, shuffle=False, num_workers=2)))
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    direct = to_tensor([ds[i][0] for i in range(6)])
    assert torch.equal(x, direct) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(12 <= v <= 32 for v in r.tolist())
    ds.set_epoch(1)
    assert not np.array_equal(ds[0][0], DegradedFaces(ds.dataset, ds.degrade, seed=4)[0][0])
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="share a shape"):
        to_tensor([np.zeros((4, 4, 3), np.uint8), np.zeros((5, 4, 3), np.uint8)])


def _loo_nearest_centroid(F: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out nearest-class-centroid accuracy."""
    n = int(y.max()) + 1
    sums = np.zeros((n, F.shape[1]))
    np.add.at(sums, y, F)
    counts = np.bincount(y, minlength=n).astype(float)
    hits = 0
    for i in range(len(F)):
        C, c = sums.copy(), counts.copy()
        C[y[i]] -= F[i]
        c[y[i]] -= 1
        hits += int(np.argmin((((C / c[:, None]) - F[i]) ** 2).sum(1)) == y[i])
    return hits / len(F)


def test_low_resolution_makes_identities_harder():
    """With mild nuisance, raw pixels recognise high-res identities well; at 12 px they do much worse."""
    ds = SyntheticFaces(40, 3, 64, seed=int(torch.randint(0, 10_000, (1,))), variation=0.3)
    hr, y = ds.materialize(), ds.labels
    lr = Degrade.fixed(12, out_size=64, blur_sigma=0.7)(hr)
    feat = lambda a: ((a - a.mean((1, 2, 3), keepdims=True)) / a.std((1, 2, 3), keepdims=True)).reshape(len(a), -1)  # noqa: E731
    acc_hr = _loo_nearest_centroid(feat(hr.astype(np.float32)), y)
    acc_lr = _loo_nearest_centroid(feat(lr.astype(np.float32)), y)
    assert acc_hr > 0.75 and acc_lr < acc_hr - 0.1, (acc_hr, acc_lr)
