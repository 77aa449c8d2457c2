"""Named backbone sizes and the constructors ``face_swin`` / ``face_vit``.

``"petalface"`` is the paper's released Swin; ``"small"`` keeps its 120×120 input and layout at a
CPU-friendly width; ``"tiny"`` (40×40, two stages, 0.35 M parameters) trains in minutes on two
cores and is what the tests and the CPU demo use. ViT sizes follow arcface_torch.
"""
from __future__ import annotations

from typing import Any

from .swin import FaceSwin
from .vit import FaceViT

SWIN_PRESETS: dict[str, dict[str, Any]] = {
    "petalface": dict(img_size=120, patch_size=6, embed_dim=384, depths=(2, 18, 2), num_heads=(8, 16, 16),
                      window_size=5, embedding_size=512, drop_path_rate=0.1),
    "small": dict(img_size=120, patch_size=6, embed_dim=96, depths=(2, 4, 2), num_heads=(3, 6, 12),
                  window_size=5, embedding_size=256, drop_path_rate=0.1),
    "tiny": dict(img_size=40, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                 window_size=5, embedding_size=128, drop_path_rate=0.0),
}

VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit_t": dict(img_size=112, patch_size=9, embed_dim=256, depth=12, num_heads=8, embedding_size=512,
                  drop_path_rate=0.1),
    "vit_s": dict(img_size=112, patch_size=9, embed_dim=512, depth=12, num_heads=8, embedding_size=512,
                  drop_path_rate=0.1),
    "vit_b": dict(img_size=112, patch_size=9, embed_dim=512, depth=24, num_heads=8, embedding_size=512,
                  drop_path_rate=0.1),
    "tiny": dict(img_size=36, patch_size=9, embed_dim=32, depth=2, num_heads=2, embedding_size=64,
                 drop_path_rate=0.0),
}


def _merge(presets: dict[str, dict[str, Any]], preset: str, overrides: dict[str, Any], kind: str) -> dict[str, Any]:
    if preset not in presets:
        raise ValueError(f"unknown {kind} preset {preset!r}; choose one of {sorted(presets)}")
    return {**presets[preset], **overrides}


def face_swin(preset: str = "petalface", paper_compat: bool = False, **overrides: Any) -> FaceSwin:
    """The face Swin at a named size; keyword arguments override single fields (e.g. ``img_size``).

    ``paper_compat=True`` leaves the shifted-window mask unapplied, as the released code does.
    """
    return FaceSwin(paper_compat=paper_compat, **_merge(SWIN_PRESETS, preset, overrides, "face_swin"))


def face_vit(preset: str = "vit_t", **overrides: Any) -> FaceViT:
    """The arcface_torch-layout face ViT at a named size; keyword arguments override single fields."""
    return FaceViT(**_merge(VIT_PRESETS, preset, overrides, "face_vit"))
