"""Backbones: the paper's face Swin (layout, counts on the meta device), shifted windows, face ViT."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import petal_fast
from petal_fast.models import FaceSwin, face_swin, face_vit
from petal_fast.models.swin import PatchMerging, SwinBlock, shifted_window_mask, window_partition, window_reverse

LAYOUT = Path(__file__).parent / "data" / "petalface_swin_state_dict.txt"


def released_layout() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in LAYOUT.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, rest = line.split(None, 1)
        shape = rest.rsplit(None, 1)[0]
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def test_paper_swin_matches_released_layout_and_count():
    with torch.device("meta"):
        model = face_swin("petalface")
    sd = model.state_dict()
    ref = {k: v for k, v in released_layout().items() if "trainable_lora" not in k}
    assert set(sd) == set(ref)
    assert {k: tuple(v.shape) for k, v in sd.items()} == ref
    assert sum(p.numel() for p in model.parameters()) == 213_666_768
    # last stage is 5×5: one window, no shift, no mask
    assert model.layers[2].blocks[1].shift == 0 and model.layers[2].blocks[1].attn_mask is None
    assert model.layers[1].blocks[1].attn_mask.shape == (4, 25, 25)


@pytest.mark.parametrize("size", [(20, 20), (10, 15)])
def test_window_partition_round_trip(size):
    x = torch.randn(3, *size, 7)
    w = window_partition(x, 5)
    assert w.shape == (3 * size[0] * size[1] // 25, 25, 7)
    assert torch.equal(window_reverse(w, 5, *size), x)
    # image-major: the first nW windows are all from image 0
    assert torch.equal(w[: w.shape[0] // 3].flatten(), window_partition(x[:1], 5).flatten())


def test_patch_merging_order_is_swins():
    """Released checkpoints depend on Swin's concat order [x(0,0), x(1,0), x(0,1), x(1,1)]."""
    merge = PatchMerging((6, 10), 5)
    x = torch.randn(2, 60, 5)
    g = x.view(2, 6, 10, 5)
    cat = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], dim=-1)
    expected = merge.reduction(merge.norm(cat.reshape(2, -1, 20)))
    assert torch.equal(merge(x), expected)


def _regions(h: int, w: int, window: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(window id, shifted region id) of every token in the ORIGINAL (unrolled) frame, as (h, w)."""
    rows, cols = torch.arange(h), torch.arange(w)
    i, j = (rows - shift) % h, (cols - shift) % w  # where token (h, w) sits after roll(−shift)
    def band(t, n):
        return torch.where(t < n - window, 0, torch.where(t < n - shift, 1, 2))
    region = band(i, h)[:, None] * 3 + band(j, w)[None, :]
    win = (i // window)[:, None] * (w // window) + (j // window)[None, :]
    return win, region


@pytest.mark.parametrize("paper_compat", [False, True])
def test_shifted_window_mask(paper_compat):
    h = w = 10
    block = SwinBlock(8, (h, w), num_heads=2, window=5, shift=2, paper_compat=paper_compat).double().eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, h * w, 8, dtype=torch.float64)
    win, region = _regions(h, w, 5, 2)
    # a token in the bottom-right window, which holds four shifted regions
    t = (h - 1) * w + (w - 1)
    assert len(set(region.flatten()[win.flatten() == win.flatten()[t]].tolist())) == 4
    x2 = x.clone()
    x2[0, t] += torch.randn(8, dtype=torch.float64)
    with torch.no_grad():
        diff = (block(x2) - block(x)).abs().amax(-1)  # (B, L)
    same_win = win.flatten() == win.flatten()[t]
    same_region = region.flatten() == region.flatten()[t]
    assert diff[1].max() == 0  # other image untouched
    assert (diff[0][~same_win] == 0).all()  # other windows untouched
    assert (diff[0][same_win & same_region] > 1e-6).all()
    other = diff[0][same_win & ~same_region]
    if paper_compat:  # released behaviour: the mask is built but not applied
        assert (other > 1e-6).all()
    else:
        assert other.max() < 1e-12
    assert torch.equal(block.attn_mask, shifted_window_mask(h, w, 5, 2))


def test_tiny_swin_forward_backward_and_errors():
    model = face_swin("tiny")
    x = torch.randn(3, 3, 40, 40)
    out = model(x)
    assert out.shape == (3, 128) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="images must be"):
        model(torch.randn(3, 3, 48, 48))
    with pytest.raises(ValueError, match="num_heads"):
        FaceSwin(depths=(2, 2), num_heads=(2,))
    with pytest.raises(ValueError, match="divisible"):
        FaceSwin(img_size=41, patch_size=4)
    with pytest.raises(ValueError, match="unknown face_swin preset"):
        face_swin("huge")


def test_vit_layout_and_masking():
    with torch.device("meta"):
        vit_t = face_vit("vit_t")
    sd = vit_t.state_dict()
    assert sd["patch_embed.proj.weight"].shape == (256, 3, 9, 9)
    assert sd["pos_embed"].shape == (1, 144, 256)
    assert sd["feature.0.weight"].shape == (256, 256 * 144) and "feature.0.bias" not in sd
    assert sd["blocks.11.attn.qkv.weight"].shape == (768, 256) and "blocks.0.attn.qkv.bias" not in sd
    assert sd["feature.3.running_var"].shape == (512,) and "mask_token" in sd
    model = face_vit("tiny", mask_ratio=0.25)
    x = torch.randn(2, 3, 36, 36)
    model.train()
    assert model(x).shape == (2, 64)
    model.eval()
    assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="mask_ratio"):
        face_vit("tiny", mask_ratio=1.0)


@pytest.mark.parametrize("backbone", ["tiny", "vit_tiny"])
def test_attention_impl_is_the_models_choice(backbone):
    """The model picks its attention (SDPA or the literal softmax formula), not the op backend: both
    give the same embeddings, and the backend switch leaves the choice alone."""
    from petal_fast.models import build_model, set_attention_impl
    model = build_model("lora", backbone, num_classes=3).double().eval()
    size = model.backbone.img_size
    images = torch.rand(2, 3, size, size, dtype=torch.float64) * 2 - 1
    impls = lambda m: {a.attention_impl for a in m.modules() if hasattr(a, "attention_impl")}  # noqa: E731
    with torch.no_grad():
        fused = model.embed(images)
        with petal_fast.use_backend("reference"):
            assert impls(model) == {"sdpa"}
        literal = set_attention_impl(model, "math").embed(images)
    assert impls(model) == {"math"}
    torch.testing.assert_close(literal, fused, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        set_attention_impl(model, "flash")
