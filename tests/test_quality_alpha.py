"""Quality → α: bounds, orientation, the released ('paper') mapping, calibration from tensors /
datasets / loaders, the checkpoint round trip, and the quality sources."""
from __future__ import annotations

import io

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import petal_fast
from petal_fast.quality import (BrisqueQuality, CallableQuality, FeatureNormQuality, QualityToAlpha,
                                ResolutionQuality, alpha_from_quality, brisque, calibrate)


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_alpha_bounds_and_orientation():
    q = torch.randn(1000, dtype=torch.float64) * 50
    tau = q.median().item()
    a = alpha_from_quality(q, tau, slope=0.1)
    assert a.min() >= 0 and a.max() <= 1 and (a == 0).any() and (a == 1).any()
    order = q.argsort()
    assert torch.all(a[order].diff() >= 0)  # higher quality → larger α
    b = alpha_from_quality(q, tau, slope=0.1, higher_is_better=False)
    assert torch.all(b[order].diff() <= 0)  # BRISQUE-like: higher score → smaller α
    assert torch.allclose(a + b, torch.ones_like(a))
    at_tau = alpha_from_quality(torch.tensor([tau], dtype=torch.float64), tau)
    assert at_tau.item() == 0.5


def test_alpha_paper_mode_is_the_released_formula():
    score = torch.rand(64, dtype=torch.float64) * 100
    tau = 37.5
    a = alpha_from_quality(score, tau, slope=0.3, mode="paper", higher_is_better=False)
    assert torch.equal(a, 0.5 + (score - tau))  # unclamped, unoriented, slope unused
    assert a.max() > 1 and a.min() < 0


def test_alpha_errors():
    with pytest.raises(ValueError, match="mode"):
        alpha_from_quality(torch.rand(3), 0.0, mode="clamped")
    with pytest.raises(ValueError, match="slope"):
        alpha_from_quality(torch.rand(3), 0.0, slope=-1.0)
    with pytest.raises(TypeError, match="q must be a tensor"):
        alpha_from_quality([0.1, 0.2], 0.0)
    with pytest.raises(ValueError, match="mode"):
        QualityToAlpha("brisque", mode="x")
    with pytest.raises(ValueError, match="source"):
        QualityToAlpha("cnniqa")
    with pytest.raises(TypeError, match="source"):
        QualityToAlpha(3)


def _images(n: int, h: int = 24, w: int = 20) -> torch.Tensor:
    """Images of graded quality: increasing blur / noise mix, all inside [0, 1]."""
    base = torch.rand(n, 3, h, w)
    blurred = torch.nn.functional.avg_pool2d(base, 5, 1, 2)
    mix = torch.linspace(0, 1, n)[:, None, None, None]
    return (mix * base + (1 - mix) * blurred).clamp(0, 1)


def test_calibrate_tensor_dataset_loader_agree():
    x = _images(20)
    scores = brisque(x)
    want = torch.quantile(scores, 0.5).item()
    from_tensor = calibrate("brisque", x, batch_size=6, progress=False)
    from_dataset = calibrate("brisque", TensorDataset(x, torch.arange(20)), batch_size=7, progress=False)
    from_loader = calibrate("brisque", DataLoader(TensorDataset(x), batch_size=5), progress=False)
    for m in (from_tensor, from_dataset, from_loader):
        assert abs(m.tau.item() - want) < 1e-9 and bool(m.calibrated)
        assert m.mode == "oriented" and m.slope.item() == BrisqueQuality.default_slope
    alpha = from_tensor(x)
    assert alpha.dtype == torch.float32 and alpha.shape == (20,)
    assert torch.all(alpha[scores.argsort()].diff() <= 0)  # lower BRISQUE (better) → larger α
    assert abs((alpha > 0.5).float().mean().item() - 0.5) <= 0.1  # τ splits the data


def test_calibrate_slope_spread_and_limits():
    q = torch.arange(100, dtype=torch.float64)
    src = CallableQuality(lambda images: q[images[:, 0, 0, 0].long()])
    data = torch.arange(100.0)[:, None, None, None].expand(100, 1, 2, 2)
    m = calibrate(src, data, slope="spread", batch_size=16, progress=False)
    q10, q90 = torch.quantile(q, 0.1).item(), torch.quantile(q, 0.9).item()
    assert abs(m.slope.item() - 0.8 / (q90 - q10)) < 1e-12
    a = m.alpha(torch.tensor([q10, q90], dtype=torch.float64))
    assert torch.allclose(a, torch.tensor([0.1, 0.9]), atol=1e-6)
    part = calibrate(src, data, batch_size=10, max_batches=3, progress=False)
    assert abs(part.tau.item() - 14.5) < 1e-12
    with pytest.raises(ValueError, match="slope"):
        calibrate(src, data, slope=0.0, progress=False)
    with pytest.raises(ValueError, match="no images"):
        calibrate(src, data[:0], progress=False)
    with pytest.raises(TypeError, match="data must be"):
        calibrate(src, [1, 2, 3], progress=False)
    nan_src = CallableQuality(lambda images: torch.full((images.shape[0],), float("nan")))
    with pytest.raises(ValueError, match="non-finite"):
        calibrate(nan_src, data, progress=False)


def test_checkpoint_roundtrip_weights_only():
    x = _images(12)
    m = calibrate("brisque", x, slope=0.05, mode="paper", progress=False)
    state = _roundtrip(m.state_dict())
    fresh = QualityToAlpha("brisque")
    assert fresh.tau.item() == 0.0 and fresh.mode == "oriented"
    fresh.load_state_dict(state)
    assert fresh.tau.item() == m.tau.item() and fresh.slope.item() == 0.05 and fresh.mode == "paper"
    assert torch.equal(fresh(x), m(x))
    # inside a model's state dict, as the PETALface model holds it
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.q2a = m
    restored = torch.nn.Sequential(torch.nn.Linear(2, 2))
    restored.q2a = QualityToAlpha("brisque")
    restored.load_state_dict(_roundtrip(model.state_dict()))
    assert restored.q2a.tau.item() == m.tau.item() and restored.q2a.mode == "paper"
    with pytest.raises(ValueError, match="calibrated for source 'brisque'"):
        QualityToAlpha("resolution").load_state_dict(state)


def test_resolution_source():
    x = torch.rand(4, 3, 16, 16)
    m = QualityToAlpha(ResolutionQuality(), tau=5.0)  # τ = log2(32 px)
    sizes = torch.tensor([16, 32, 64, 112])
    a = m(x, original_size=sizes)
    assert torch.allclose(a, (0.5 + 0.5 * (torch.log2(sizes.double()) - 5)).clamp(0, 1).float())
    hw = torch.tensor([[16, 20], [32, 40], [64, 64], [112, 200]])
    assert torch.equal(m(x, original_size=hw), a)
    with pytest.raises(ValueError, match="original_size"):
        m(x)
    with pytest.raises(ValueError, match="original_size must be"):
        m(x, original_size=torch.tensor([16, 32]))
    with pytest.raises(ValueError, match="positive"):
        m(x, original_size=torch.tensor([16, 0, 3, 4]))


class _SizedFaces(Dataset):
    def __len__(self) -> int:
        return 9

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.rand(3, 16, 16), "original_size": torch.tensor(16 + 8 * i), "label": i}


def test_calibrate_resolution_from_dict_batches():
    m = calibrate("resolution", _SizedFaces(), batch_size=4, progress=False)
    want = torch.quantile(torch.log2(torch.tensor([16.0 + 8 * i for i in range(9)], dtype=torch.float64)), 0.5)
    assert abs(m.tau.item() - want.item()) < 1e-12


def test_feature_norm_source():
    emb = torch.randn(6, 8)
    x = torch.rand(6, 3, 16, 16)
    m = QualityToAlpha(FeatureNormQuality(), tau=emb.norm(dim=1).median().item(), slope=0.2)
    a = m(x, embeddings=emb)
    assert torch.all(a[emb.norm(dim=1).argsort()].diff() >= 0)  # larger norm → larger α
    enc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    with_encoder = QualityToAlpha(FeatureNormQuality(enc), tau=1.0)
    assert torch.equal(with_encoder(x), with_encoder(x, embeddings=enc(x)))
    with pytest.raises(ValueError, match="embeddings"):
        m(x)
    with pytest.raises(ValueError, match=r"embeddings must be \(6, D\)"):
        m(x, embeddings=emb[:3])


def test_callable_source_and_module_default():
    x = torch.rand(5, 3, 16, 16)
    m = QualityToAlpha(lambda images: images.mean(dim=(1, 2, 3)), tau=0.5, slope=2.0)
    assert torch.allclose(m(x), (0.5 + 2.0 * (x.mean(dim=(1, 2, 3)).double() - 0.5)).clamp(0, 1).float())
    b = QualityToAlpha("brisque", tau=40.0)
    assert torch.allclose(b(x), (0.5 - 0.02 * (brisque(x) - 40.0)).clamp(0, 1).float())
    with pytest.raises(TypeError, match="callable"):
        CallableQuality(5)


def test_removed_quality_alias_names_alpha_scope():
    """``petal_fast.quality(alpha)`` (once an alias of alpha_scope) is the quality package: calling it says
    what to use, before and after ``import petal_fast.quality``."""
    import subprocess
    import sys
    code = ("import petal_fast, torch\n"
            "try:\n    petal_fast.quality(torch.rand(3))\n"
            "except TypeError as e:\n    print('alpha_scope' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
    import petal_fast.quality  # noqa: F401
    with pytest.raises(TypeError, match="alpha_scope"):
        petal_fast.quality(torch.rand(3))
