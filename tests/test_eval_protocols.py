"""The .bin reader (safe unpickling), the protocols with flip TTA, reports, plots and run_eval."""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from petal_fast.data import SyntheticFaces
from petal_fast.eval import (UnsafePickleError, add_eval_arguments, embed_images, identification, load_bin,
                             make_pairs, markdown_table, run_eval, save_bin, split_gallery_probe, verification,
                             verification_from_embeddings, verification_pairs)


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _imgs(n: int, size: int = 12) -> np.ndarray:
    return (torch.rand(n, size, size, 3) * 255).to(torch.uint8).numpy()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_bin_formats(tmp_path, protocol):
    imgs = _imgs(6)
    # protocol 2 from Python 3 stores bytes through _codecs.encode; numpy bools via numpy's reconstruct.
    issame = np.array([True, False, True])
    path = tmp_path / "pairs.bin"
    path.write_bytes(pickle.dumps(([_png(im) for im in imgs], issame), protocol=protocol))
    images, same = load_bin(str(path))
    assert images.shape == (6, 12, 12, 3) and np.array_equal(images, imgs)
    assert same.dtype == bool and same.tolist() == [True, False, True]
    # Encoded images stored as uint8 numpy arrays, issame as a list; resize on load.
    path.write_bytes(pickle.dumps(([np.frombuffer(_png(im), np.uint8) for im in imgs], [True, False, True]), protocol=protocol))
    images, same = load_bin(str(path), image_size=20)
    assert images.shape == (6, 20, 20, 3)


def test_load_bin_python2_pickle(tmp_path):
    """A protocol-2 pickle as Python 2 wrote it: images as py2 ``str`` (BINSTRING), issame as bools."""
    imgs = _imgs(4)
    raw = b"\x80\x02](" + b"".join(b"T" + struct.pack("<I", len(b)) + b for b in map(_png, imgs)) + b"e"
    raw += b"](\x88\x89e\x86."  # [True, False], TUPLE2, STOP
    (tmp_path / "py2.bin").write_bytes(raw)
    images, same = load_bin(str(tmp_path / "py2.bin"))
    assert np.array_equal(images, imgs) and same.tolist() == [True, False]


def test_save_bin_roundtrip(tmp_path):
    imgs = _imgs(4)
    save_bin(str(tmp_path / "x.bin"), imgs, [True, False], image_format="PNG")
    images, same = load_bin(str(tmp_path / "x.bin"))
    assert np.array_equal(images, imgs) and same.tolist() == [True, False]
    with pytest.raises(ValueError, match="need 4 images"):
        save_bin(str(tmp_path / "y.bin"), imgs[:3], [True, False])


class _Exploit:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_crafted_bin_with_callable_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit(str(marker))], [True]), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"evil\.bin: refusing to unpickle global (posix|os|nt)\.system"):
        load_bin(str(path))
    assert not marker.exists()
    path.write_bytes(pickle.dumps((eval, [True])))
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_bin(str(path))
    path.write_bytes(pickle.dumps(([np.array([{"a": 1}], dtype=object)], [True])))
    with pytest.raises(UnsafePickleError, match="object"):
        load_bin(str(path))


def test_load_bin_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        load_bin(str(tmp_path / "nope.bin"))
    good = pickle.dumps(([_png(im) for im in _imgs(4)], [True, False]))
    p = tmp_path / "cut.bin"
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut\.bin: not a readable verification \.bin"):
        load_bin(str(p))
    p.write_bytes(pickle.dumps(([_png(im) for im in _imgs(3)], [True, False])))
    with pytest.raises(ValueError, match="2 pairs need 4 images but the file holds 3"):
        load_bin(str(p))
    p.write_bytes(pickle.dumps(([_png(im) for im in _imgs(3)] + [b"garbage"], [True, False])))
    with pytest.raises(ValueError, match=r"image 3 \(pair 1\) failed to decode"):
        load_bin(str(p))
    p.write_bytes(pickle.dumps({"not": "a pair"}))
    with pytest.raises(ValueError, match="expected a pickled"):
        load_bin(str(p))
    p.write_bytes(pickle.dumps(([_png(_imgs(1, 12)[0]), _png(_imgs(1, 14)[0])], [True])))
    with pytest.raises(ValueError, match="pass image_size"):
        load_bin(str(p))


def test_embed_images_flip_tta():
    w = torch.randn(3 * 8 * 8, 5)
    def embed(x):  # not mirror-invariant, so flip TTA changes the result
        return x.flatten(1) @ w
    imgs = _imgs(5, 8)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    expect = torch.nn.functional.normalize(embed(x) + embed(x.flip(3)), dim=1).numpy()
    np.testing.assert_allclose(embed_images(embed, imgs, batch_size=2, flip=True), expect, rtol=1e-5, atol=1e-6)
    plain = torch.nn.functional.normalize(embed(x), dim=1).numpy()
    np.testing.assert_allclose(embed_images(embed, imgs, batch_size=3, flip=False), plain, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        embed_images(lambda x: x.sum(), imgs)
    with pytest.raises(ValueError, match="no images"):
        embed_images(embed, imgs[:0])


def _colour_faces(labels, noise: float, seed: int) -> np.ndarray:
    """Flat images whose colour is the identity: an embedding of the mean colour separates them."""
    g = np.random.default_rng(seed)
    palette = np.random.default_rng(123).uniform(30, 225, (100, 3))
    base = palette[np.asarray(labels)][:, None, None, :]
    return np.clip(base + g.normal(0, noise, (len(labels), 8, 8, 3)), 0, 255).astype(np.uint8)


def _mean_colour(x: torch.Tensor) -> torch.Tensor:
    return x.mean((2, 3)) - 0.5


def test_verification_protocol_separable():
    labels = np.repeat(np.arange(20), 3)
    pairs = make_pairs(labels, 40, seed=1)
    issame = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    assert issame.sum() == 20  # balanced
    imgs = _colour_faces(labels, 2.0, 0)[pairs.reshape(-1)]
    r = verification(_mean_colour, imgs, issame, batch_size=16)
    assert r["accuracy"] > 0.9 and r["auc"] > 0.95 and r["num_pairs"] == 40
    assert set(r["tar_at_far"]) == {"0.0001", "0.001", "0.01", "0.1"}
    emb = np.eye(4)[[0, 0, 1, 2, 3, 3, 1, 1] * 5]  # pairs (same, diff, same, same) × 5
    v = verification_from_embeddings(emb, [True, False, True, True] * 5)
    assert v["accuracy"] == 1.0 and v["auc"] == 1.0 and v["tar_at_far"]["0.1"]["tar"] == 1.0
    with pytest.raises(ValueError, match="need"):
        verification_from_embeddings(emb[:-1], [True, False, True, True] * 5)


def test_identification_protocol_with_distractors_and_open_set():
    labels = np.repeat(np.arange(10), 4)
    g, p = split_gallery_probe(labels, gallery_per_identity=1, seed=0)
    assert len(g) == 10 and len(p) == 30 and set(labels[g]) == set(range(10))
    imgs = _colour_faces(labels, 1.0, 1)
    distractors = _colour_faces(np.arange(50, 70), 1.0, 2)
    r = identification(_mean_colour, imgs[p], labels[p], imgs[g], labels[g], distractor_images=distractors,
                       ranks=(1, 5), flip=False)
    assert r["rank"] == {"1": 1.0, "5": 1.0} and r["num_gallery"] == 30 and r["num_distractors"] == 20
    assert "tpir_at_fpir" not in r and r["cmc"][0] == 1.0
    g, p = split_gallery_probe(labels, open_set_fraction=0.3, seed=0)
    assert len(g) == 7
    r = identification(_mean_colour, imgs[p], labels[p], imgs[g], labels[g], flip=False, fpirs=(0.5,))
    assert r["num_mated_probes"] == 21 and r["tpir_at_fpir"]["0.5"]["tpir"] > 0.5
    with pytest.raises(ValueError, match="more than gallery_per_identity"):
        split_gallery_probe(labels, gallery_per_identity=4)


def test_markdown_report_marks_unbacked_points():
    res = {"lfw": {"accuracy": 0.99, "accuracy_std": 0.01, "auc": 0.999, "num_pairs": 6,
                   "tar_at_far": {"0.1": {"tar": 0.5, "resolved": False}}}}
    md = markdown_table(res)
    assert "| lfw | 6 | 99.00 | 1.00 | 99.90 | 50.00† |" in md and "†" in md.splitlines()[-1]


def test_run_eval_end_to_end(tmp_path):
    # A .bin of synthetic pairs and an ImageFolder, evaluated by a pixel embedding; all outputs written.
    ds = SyntheticFaces(6, 4, 32, seed=3)
    pair_images, issame = verification_pairs(ds, 20, seed=0)
    pairs = make_pairs(ds.labels, 20, seed=0)
    arr = ds.materialize()
    assert np.array_equal(pair_images, arr[pairs.reshape(-1)]) and issame.sum() == 10
    save_bin(str(tmp_path / "syn.bin"), pair_images, issame)
    root = tmp_path / "folder"
    for i, (im, lab) in enumerate(zip(arr, ds.labels)):
        (root / f"id{lab}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / f"id{lab}" / f"{i}.png")
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--data", str(tmp_path / "syn.bin"), "--data", str(root), "--data", "synthetic:ids=5,per_id=3,seed=1",
                              "--image-size", "32", "--num-pairs", "20", "--out", str(tmp_path / "out"),
                              "--lowres", "12", "--batch-size", "16"])
    embed = lambda x: torch.nn.functional.avg_pool2d(x, 4).flatten(1) - 0.5  # noqa: E731
    res = run_eval(embed, args)
    assert set(res) == {"syn@12px", "folder@12px/verification", "folder@12px/identification",
                        "synthetic@12px/verification", "synthetic@12px/identification"}
    out = tmp_path / "out"
    saved = json.loads((out / "eval.json").read_text())
    assert saved["syn@12px"]["num_pairs"] == 20 and 0.0 <= saved["syn@12px"]["accuracy"] <= 1.0
    assert "folder@12px/identification" in (out / "eval.md").read_text()
    for png in ("roc.png", "cmc.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100
    # A caller that already defines --device keeps its own.
    own = argparse.ArgumentParser()
    own.add_argument("--device", default="cpu")
    assert add_eval_arguments(own).parse_args(["--data", "x.bin"]).device == "cpu"
    bad = parser.parse_args(["--data", str(tmp_path / "missing_dir"), "--out", str(out)])
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        run_eval(embed, bad)
    with pytest.raises(ValueError, match="unknown synthetic option"):
        run_eval(embed, parser.parse_args(["--data", "synthetic:colour=1", "--out", str(out)]))
