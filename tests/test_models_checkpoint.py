"""Checkpoints: released layout, pretrained backbones, adapter-only files, untrusted input."""
from __future__ import annotations

import re

import pytest
import torch

import petal_fast

from petal_fast.models import (CheckpointError, PetalFace, face_swin, face_vit, load_petalface_checkpoint,
                               save_checkpoint, to_released, trainable_state_dict)
from test_models import released_layout
from test_models_petalface import randomize_adapters, tiny


def test_to_released_of_paper_preset_is_the_released_layout():
    with torch.device("meta"):
        model = PetalFace("petalface", quality=None)
    out = to_released(model)
    assert {k: tuple(v.shape) for k, v in out.items()} == released_layout()


def test_released_layout_loads_into_paper_preset():
    """Every key and shape of the released file maps onto the paper preset (meta device: no memory)."""
    sd = {k: torch.empty(shape, device="meta", dtype=torch.int64 if k.endswith(("_index", "num_batches_tracked"))
                         else torch.float32)
          for k, shape in released_layout().items()}
    with torch.device("meta"):
        model = PetalFace("petalface", quality=None)
    report = load_petalface_checkpoint(model, {"state_dict": {"module." + k: v for k, v in sd.items()}})
    assert report.kind == "full" and not (report.missing or report.unexpected or report.mismatched)
    assert len(report.loaded) == len(model.backbone.state_dict())


@pytest.mark.parametrize("wrap", ["module_prefix", "state_dict", "plain"])
def test_released_layout_round_trip(tmp_path, wrap):
    src = tiny().eval()
    sd = to_released(src)
    assert any(k.endswith("attn.qkv.trainable_lora_down2.weight") for k in sd)
    assert "feature_layer.2.trainable_lora_up.weight" in sd and "feature_layer.2.trainable_lora_up2.weight" not in sd
    if wrap == "module_prefix":
        sd = {"module." + k: v for k, v in sd.items()}
    if wrap != "plain":
        sd = {"state_dict": sd, "epoch": 3}
    path = tmp_path / "released.pt"
    torch.save(sd, path)
    dst = tiny().eval()
    report = load_petalface_checkpoint(dst, path)
    assert report.kind == "full" and not (report.missing or report.unexpected or report.mismatched)
    x, alpha = torch.randn(2, 3, 40, 40), torch.rand(2)
    assert torch.equal(dst(x, alpha=alpha), src(x, alpha=alpha))
    # released branch order: down/up is weighted by (1 − α) → branch 0
    layer = "layers.0.blocks.1.attn.qkv"
    released = to_released(src)[f"{layer}.trainable_lora_down.weight"]
    assert torch.equal(dst.backbone.get_submodule(layer).lora_A[0], released)


@pytest.mark.parametrize("name", ["tiny", "vit_tiny"])
def test_pretrained_backbone_without_adapters(name):
    """An arcface_torch-style backbone file (no adapter keys) starts PETALface: adapters keep B = 0."""
    backbone = (face_swin("tiny") if name == "tiny" else face_vit("tiny")).eval()
    model = PetalFace(name, quality=None).eval()
    report = load_petalface_checkpoint(model, {"model": backbone.state_dict()})
    assert report.kind == "backbone" and not report.missing and not report.unexpected
    size = backbone.img_size
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(model(x, alpha=torch.rand(2)), backbone(x))


def test_model_file_into_bare_backbone():
    src = tiny().eval()
    sd = {k: v for k, v in src.state_dict().items() if k.startswith("backbone.")}
    bare = PetalFace("tiny", quality=None).backbone.eval()
    report = load_petalface_checkpoint(bare, sd)
    assert report.kind == "full" and not (report.missing or report.unexpected)
    with torch.no_grad(), petal_fast.alpha_scope(torch.full((2,), 0.3)):
        x = torch.randn(2, 3, 40, 40)
        assert torch.equal(bare(x), src.backbone(x))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_adapter_only_round_trip(tmp_path, suffix):
    src = tiny().eval()
    path = tmp_path / f"adapters{suffix}"
    save_checkpoint(src, path, trainable_only=True)
    dst = tiny().eval()
    dst.backbone.load_state_dict({k: v for k, v in src.backbone.state_dict().items() if "lora" not in k}, strict=False)
    report = load_petalface_checkpoint(dst, path)
    assert report.kind == "adapters" and set(report.loaded) == set(trainable_state_dict(src))
    x, alpha = torch.randn(2, 3, 40, 40), torch.rand(2)
    assert torch.equal(dst(x, alpha=alpha), src(x, alpha=alpha))


def test_bad_checkpoints_list_the_offending_keys():
    model = tiny()
    good = to_released(tiny())
    missing = {k: v for k, v in good.items() if k != "layers.1.blocks.0.norm1.weight"}
    with pytest.raises(CheckpointError, match=re.escape("backbone.layers.1.blocks.0.norm1.weight")):
        load_petalface_checkpoint(model, missing)
    derived = {k: v for k, v in good.items() if not k.endswith(("attn_mask", "relative_position_index"))}
    assert load_petalface_checkpoint(model, derived).kind == "full"  # rebuilt buffers are optional
    extra = {**good, "layers.9.blocks.0.norm1.weight": torch.ones(3)}
    with pytest.raises(CheckpointError, match=r"unexpected 1: layers\.9\.blocks\.0\.norm1\.weight"):
        load_petalface_checkpoint(model, extra)
    wrong_rank = to_released(PetalFace("tiny", quality=None, rank=4))
    expected = "layers.0.blocks.0.attn.qkv.lora_A: model (2, 8, 32) vs checkpoint (2, 4, 32)"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_petalface_checkpoint(model, wrong_rank)
    half = {k: v for k, v in good.items() if not k.endswith("qkv.trainable_lora_up2.weight")}
    with pytest.raises(CheckpointError, match="trainable_lora_up2"):
        load_petalface_checkpoint(model, half)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_petalface_checkpoint(model, {"epoch": 3, "config": {"lr": 0.1}})
    # non-strict: loads what fits and reports the rest
    before = model.backbone.layers[1].blocks[0].norm1.weight.clone()
    with pytest.warns(RuntimeWarning, match="missing 1"):
        report = load_petalface_checkpoint(model, missing, strict=False)
    assert report.missing == ["backbone.layers.1.blocks.0.norm1.weight"]
    assert torch.equal(model.backbone.layers[1].blocks[0].norm1.weight, before)


class Payload:  # any class: unpickling it would need arbitrary code
    pass


def test_refuses_files_that_need_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": face_swin("tiny").state_dict(), "obj": Payload()}, path)
    with pytest.raises(CheckpointError, match="arbitrary pickled"):
        load_petalface_checkpoint(tiny(), path)


def test_randomize_helper_changes_outputs():
    """Guard for the round-trip tests above: randomised adapters really change the embedding."""
    a = tiny().eval()
    b = PetalFace("tiny", quality=None, dropout=0.0).eval()
    b.load_state_dict(a.state_dict())
    randomize_adapters(b)
    x, alpha = torch.randn(2, 3, 40, 40), torch.rand(2)
    assert not torch.allclose(a(x, alpha=alpha), b(x, alpha=alpha))
