"""The model a training config asks for, and which of its parts train."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from petal_fast.config import ConfigError, TrainConfig
from petal_fast.models.weights import LoadReport
from petal_fast.nn import PetalLinear


def build_training_model(cfg: TrainConfig, num_classes: int | None, device: torch.device) -> nn.Module:
    """The config's mode, backbone, adapters, quality measure and margin head, on ``device``."""
    from petal_fast.models import build_model
    loss, margins = cfg.margin_args()
    common = dict(loss=loss, margins=margins, loss_scale=cfg.loss_scale, grad=cfg.grad,
                  head_kwargs={"sample_rate": cfg.sample_rate} if cfg.sample_rate < 1 else None)
    backbone: Any = cfg.backbone
    if cfg.backbone_overrides or cfg.paper_compat:
        from petal_fast.models import build_backbone
        extra = dict(cfg.backbone_overrides)
        if not cfg.backbone.startswith("vit"):
            extra["paper_compat"] = cfg.paper_compat
        backbone = build_backbone(cfg.backbone, **extra)
    if cfg.trains_adapters:
        common.update(rank=cfg.rank, scale=cfg.scale, dropout=cfg.dropout, targets=tuple(cfg.targets),
                      feature_lora=cfg.feature_lora, feature_rank=cfg.feature_rank)
    if cfg.mode == "petalface":  # a fixed α replaces the quality measure (PetalFace takes a constant α)
        common.update(quality=cfg.quality if cfg.fixed_alpha is None else cfg.fixed_alpha, alpha_mode=cfg.alpha_mode)
    # full_ft needs its checkpoint: it is loaded below, with the run's own rules
    mode = "pretrain" if cfg.mode == "full_ft" else cfg.mode
    model = build_model(mode, backbone=backbone, num_classes=num_classes, **common)
    if cfg.pretrained is not None:
        load_pretrained(model, cfg.pretrained, partial=cfg.pretrained_partial)
    return model.to(device)


def load_pretrained(model: nn.Module, path: str, partial: bool = False) -> LoadReport:
    """``pretrained=``: every backbone tensor the checkpoint kind needs must be there with its shape
    (missing, unexpected and mismatched tensors are listed), unless ``partial`` (``pretrained_partial``),
    which loads what fits and warns; a file that fits less than half of the backbone is an error either
    way. A margin head of another shape (the pretraining task's classes) is not this run's: left out."""
    from petal_fast.models import CheckpointError, load_petalface_checkpoint, safe_load, unwrap_state_dict
    state = unwrap_state_dict(safe_load(path))
    own = model.state_dict()
    other_task = {k for k, v in state.items() if k.startswith("head.") and (k not in own or own[k].shape != v.shape)}
    fitting = {k: v for k, v in state.items() if k not in other_task}
    try:
        report = load_petalface_checkpoint(model, fitting, strict=not partial)
    except CheckpointError as err:
        raise ConfigError(f"pretrained={path} does not fit this model (backbone {type(model.backbone).__name__}): "
                          f"{str(err).split(': ', 1)[-1]}. Use a checkpoint of this backbone, or set "
                          "pretrained_partial=true to load only the tensors that fit") from None
    rebuilt = (".lora_A", ".lora_B", ".attn_mask", ".relative_position_index", ".num_batches_tracked")
    base = [k for k in own if k.startswith("backbone.") and not k.endswith(rebuilt)]
    fit = [k for k in report.loaded if k in base]
    if 2 * len(fit) < len(base):  # a few biases that fit by chance do not make a pretrained backbone
        raise ConfigError(f"pretrained={path}: only {len(fit)} of the {len(base)} tensors of this model's backbone "
                          f"({type(model.backbone).__name__}) fit, so it would train from random weights; "
                          f"is it a checkpoint of another backbone? {report}")
    return report


def set_train_mode(model: nn.Module, cfg: TrainConfig) -> None:
    """Adapter modes keep the frozen backbone frozen: BatchNorm statistics and backbone dropout stay
    those of the pretrained model (eval mode); adapters (their dropout) and the head train."""
    model.train()
    if cfg.trains_adapters and not cfg.backbone_train_mode:
        model.backbone.eval()
        for m in model.backbone.modules():
            if isinstance(m, PetalLinear):
                m.train()


def image_size_of(model: nn.Module) -> int:
    size = getattr(model.backbone, "img_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if not isinstance(size, int):
        raise TypeError(f"backbone {type(model.backbone).__name__} must expose an integer img_size")
    return size


def preset_image_size(cfg: TrainConfig) -> int:
    """Input size of the configured backbone preset, without building it."""
    from petal_fast.models import SWIN_PRESETS, VIT_PRESETS
    name = cfg.backbone
    table = VIT_PRESETS if name.startswith("vit") else SWIN_PRESETS
    key = name if name in table else name.split("_", 1)[-1]
    if key not in table:
        raise ValueError(f"unknown backbone preset {name!r}")
    return int(cfg.backbone_overrides.get("img_size", table[key]["img_size"]))
