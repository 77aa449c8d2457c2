"""Degenerate shapes and values, and state that is valid only together: empty batches in the C++
kernels and models, blank images in BRISQUE → α, merged layers and their adapters, broken checkpoints."""
from __future__ import annotations

import warnings

import pytest
import torch

import petal_fast
from petal_fast import PetalLinear, _ext, adapter_state_dict, load_adapter_state_dict
from petal_fast.cpu_tuning import cpu_tuning
from petal_fast.models import CheckpointError, build_model, load_petalface_checkpoint, safe_load
from petal_fast.quality import DegenerateImageWarning, QualityToAlpha, alpha_from_quality, brisque, calibrate

from conftest import triton_interpreter_ok

needs_cpp = pytest.mark.skipif(_ext.load_error() is not None, reason="C++ extension not built")


# --- empty batches -------------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("branches", [1, 2])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("path", ["blocked", "whole"])
def test_cpp_petal_linear_kernels_take_zero_rows(branches, p, path):
    """0 rows and 0 images: empty outputs and exactly-zero adapter gradients, no division by zero."""
    with cpu_tuning(path=path):
        fwd, bwd = _ext.op("petal_linear_fwd"), _ext.op("petal_linear_bwd")
        r, k, n = 4, 16, 24
        x, w, b = torch.randn(0, k), torch.randn(n, k), torch.randn(n)
        lora_a, lora_b = torch.randn(branches, r, k), torch.randn(branches, n, r)
        alpha = torch.rand(0) if branches == 2 else None
        y, u = fwd(x, w, b, lora_a, lora_b, alpha, 0.5, p, 7)
        assert y.shape == (0, n) and u.shape == (0, branches * r)
        dx, da, db = bwd(torch.randn(0, n), x, w, lora_a, lora_b, alpha, 0.5, u, p, 7, True)
        assert dx.shape == (0, k) and da.shape == lora_a.shape and db.shape == lora_b.shape
        assert torch.equal(da, torch.zeros_like(lora_a)) and torch.equal(db, torch.zeros_like(lora_b))
        if branches == 2:
            with pytest.raises(RuntimeError, match="rows must be a multiple of images"):
                fwd(torch.randn(3, k), w, b, lora_a, lora_b, alpha, 0.5, p, 7)  # rows without images: not SIGFPE


@needs_cpp
@pytest.mark.parametrize("backbone", ["tiny", "vit_tiny"])
def test_model_embeds_an_empty_batch(backbone):
    model = build_model("lora", backbone, num_classes=5)
    size = 40 if backbone == "tiny" else 36
    with petal_fast.use_backend("cpp"), torch.no_grad():
        emb = model.embed(torch.rand(0, 3, size, size))
        full = model.embed(torch.rand(2, 3, size, size))
    assert emb.shape == (0, full.shape[1]) and emb.dtype == full.dtype


@needs_cpp
def test_cpp_margin_and_brisque_kernels_take_zero_rows():
    e, w, labels = torch.randn(0, 8), torch.randn(10, 8), torch.zeros(0, dtype=torch.long)
    lse, zsum = _ext.op("margin_loss_fwd")(e, w, labels, 64.0, 1e-6)
    de, dw = _ext.op("margin_loss_bwd")(e, w, labels, lse, torch.zeros(0), torch.zeros(0), 64.0, 1e-6, True, True)
    assert lse.shape == (0,) and de.shape == (0, 8) and torch.equal(dw, torch.zeros_like(w))
    assert brisque(torch.rand(0, 3, 20, 20)).shape == (0,)


# --- degenerate images in BRISQUE → α -----------------------------------------------------------
def _batch_with_blank_images() -> torch.Tensor:
    x = torch.rand(5, 3, 24, 24)
    x[1] = 0.0                    # black
    x[3] = 0.73                   # constant grey
    x[4, :, :, :12] = 1.0         # two flat halves: no local contrast except along one edge
    x[4, :, :, 12:] = 0.0
    return x


BACKENDS = ["cpp", "torch", "reference"] + (["triton"] if triton_interpreter_ok() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_brisque_scores_degenerate_images_as_worst_with_one_warning(backend):
    if backend == "cpp" and _ext.load_error() is not None:
        pytest.skip("C++ extension not built")
    x = _batch_with_blank_images()
    with petal_fast.use_backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = brisque(x)
    degenerate = [i for i in range(5) if scores[i] == float("inf")]
    assert 1 in degenerate and 3 in degenerate and not torch.isnan(scores).any()
    assert torch.isfinite(scores[[0, 2]]).all()
    ours = [w for w in caught if issubclass(w.category, DegenerateImageWarning)]
    assert len(ours) == 1 and f"{len(degenerate)} of 5 images" in str(ours[0].message)


def test_every_backend_marks_the_same_images():
    x = _batch_with_blank_images()
    marks = []
    for backend in BACKENDS:
        if backend == "cpp" and _ext.load_error() is not None:
            continue
        with petal_fast.use_backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateImageWarning)
            marks.append(torch.isinf(brisque(x)).tolist())
    assert all(m == marks[0] for m in marks)


@pytest.mark.parametrize("mode", ["oriented", "paper"])
def test_alpha_of_degenerate_images_is_the_low_quality_branch(mode):
    x = _batch_with_blank_images()
    q2a = QualityToAlpha("brisque", tau=40.0, mode=mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateImageWarning)
        alpha = q2a(x)
    assert torch.isfinite(alpha).all() and alpha[1] == 0 and alpha[3] == 0


def test_nan_quality_from_any_source_is_worst_with_one_warning():
    q = torch.tensor([1.0, float("nan"), 3.0, float("nan")], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="2 of 4 quality values are NaN"):
        alpha = alpha_from_quality(q, tau=2.0, higher_is_better=True)
    assert alpha.tolist() == [0.0, 0.0, 1.0, 0.0]
    with pytest.warns(RuntimeWarning):
        assert torch.isfinite(alpha_from_quality(q, tau=2.0, mode="paper")).all()


def test_calibration_leaves_degenerate_images_out():
    x = torch.cat([torch.rand(6, 3, 24, 24), torch.zeros(2, 3, 24, 24)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateImageWarning)
        expected = torch.quantile(brisque(x[:6]), 0.5).item()
        with pytest.warns(RuntimeWarning, match="2 of 8 images have a non-finite quality"):
            q2a = calibrate("brisque", x, progress=False)
        assert q2a.tau.item() == pytest.approx(expected)
        with pytest.raises(ValueError, match="all 2 images have a non-finite quality"):
            calibrate("brisque", torch.zeros(2, 3, 24, 24), progress=False)


def test_petalface_model_runs_on_a_blank_image():
    model = build_model("petalface", "tiny", num_classes=5).eval()
    images = torch.rand(3, 3, 40, 40) * 2 - 1
    images[1] = -1.0  # black in the model's [-1, 1] range
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateImageWarning)
        alpha = model.alpha(images)
        emb = model.embed(images)
    assert alpha[1] == 0 and torch.isfinite(emb).all()


# --- merged layers and their adapters ------------------------------------------------------------
def _trained_layer() -> PetalLinear:
    layer = PetalLinear(8, 6, rank=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_merged_layer_refuses_to_save_both_weight_and_adapters():
    layer = _trained_layer()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.merge_(0.3)
    with pytest.raises(RuntimeError, match="is merged .*unmerge_"):
        layer.state_dict()
    with pytest.raises(RuntimeError, match=r"0\.qkv is merged"):
        torch.nn.Sequential(torch.nn.ModuleDict({"qkv": layer})).state_dict()
    layer.unmerge_()
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_loading_a_state_dict_into_a_merged_layer_gives_the_saved_model():
    src = _trained_layer()
    x, alpha = torch.randn(4, 8), torch.rand(4)
    expected = src(x, alpha=alpha)
    dst = _trained_layer().merge_(0.5)
    dst.load_state_dict(src.state_dict())
    assert not dst.merged
    torch.testing.assert_close(dst(x, alpha=alpha), expected)


def test_adapters_are_not_loaded_into_merged_layers():
    model = torch.nn.Sequential(_trained_layer())
    adapters = adapter_state_dict(torch.nn.Sequential(_trained_layer()))
    model[0].merge_(0.4)
    weight = model[0].weight.clone()
    with pytest.raises(RuntimeError, match="cannot load adapters into merged layers.*nothing was loaded"):
        load_adapter_state_dict(model, adapters)
    assert torch.equal(model[0].weight, weight)
    model[0].unmerge_()
    load_adapter_state_dict(model, adapters)


# --- broken checkpoint files ---------------------------------------------------------------------
def test_corrupt_checkpoints_name_file_and_problem(tmp_path):
    model = build_model("lora", "tiny", num_classes=5)
    good = tmp_path / "good.pt"
    torch.save({"state_dict": model.state_dict()}, good)
    data = good.read_bytes()
    cases = {"empty.pt": b"", "truncated.pt": data[: len(data) // 2], "text.pt": b"not a checkpoint at all",
             "noise.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}"}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError) as err:
            safe_load(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
        with pytest.raises(CheckpointError):
            load_petalface_checkpoint(model, str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        safe_load(tmp_path / "missing.pt")


def test_load_trained_refuses_a_foreign_file(tmp_path):
    from petal_fast.train import load_trained
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="model.pt has no training config"):
        load_trained(tmp_path)
