"""``build_model(mode, ...)``: the four training set-ups the training script offers.

- ``pretrain``: the plain backbone and margin head, everything trainable, from scratch.
- ``full_ft``:  the same, started from a pretrained backbone (``pretrained=``), everything trainable.
- ``lora``:     frozen backbone, single-branch LoRA on the targets (and the feature Linear), no α.
- ``petalface``: frozen backbone, two-branch PetalLinear on the targets weighted by quality → α.
"""
from __future__ import annotations

from typing import Any, Union

from torch import nn

from .weights import Source, load_petalface_checkpoint
from .petalface import FaceModel, PetalFace

MODES = ("pretrain", "full_ft", "lora", "petalface")


def build_model(mode: str, backbone: Union[str, nn.Module] = "petalface", num_classes: int | None = None,
                pretrained: Source | None = None, strict: bool = True, **kwargs: Any) -> FaceModel:
    """Build a face model for ``mode`` (see the module docstring).

    ``pretrained``: a backbone checkpoint (path or state dict, see :func:`load_petalface_checkpoint`)
    loaded before the adapters start training; required for ``full_ft``. ``kwargs`` go to
    :class:`FaceModel` (``loss``, ``margins``, ``loss_scale``, ``grad``, ``paper_compat``) or, for the
    adapter modes, :class:`PetalFace` (``rank``, ``scale``, ``dropout``, ``targets``, ``quality``, …).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "full_ft" and pretrained is None:
        raise ValueError("mode 'full_ft' fine-tunes a pretrained backbone: pass pretrained=<checkpoint>")
    if mode in ("pretrain", "full_ft"):
        model: FaceModel = FaceModel(backbone, num_classes, **kwargs)
        for p in model.parameters():
            p.requires_grad_(True)
    elif mode == "lora":
        for key in ("branches", "quality"):
            if key in kwargs:
                raise ValueError(f"mode 'lora' fixes {key}; use mode 'petalface' for quality-weighted adapters")
        model = PetalFace(backbone, num_classes, branches=1, quality=None, **kwargs)
    else:
        model = PetalFace(backbone, num_classes, **kwargs)
    if pretrained is not None:
        load_petalface_checkpoint(model, pretrained, strict=strict)
    return model
