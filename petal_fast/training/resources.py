"""What a run will hold, checked before it allocates: a configuration that cannot build (sizes of zero,
shapes that do not divide) or cannot fit in memory is a :class:`ConfigError` naming the keys.

The model is built on the ``meta`` device (shapes only, no memory, well under a second for the paper's
Swin) and run once on one meta image, with forward hooks summing what each leaf module outputs: the
activations a training step keeps per image, about (16-bit under amp). Estimates at the low end (fp32
weights, their gradients and AdamW's two moments, the activations, the images a synthetic set renders
into memory; no temporaries, no allocator slack), so a refusal means the run cannot fit, not that it
might not.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from petal_fast.config import ConfigError, TrainConfig
from petal_fast.memory import check_fits

FIX = ("lower the setting behind the largest part (batch_size; num_classes; backbone / backbone_overrides; rank; "
       "data.num_identities, data.images_per_identity, data.size)")


def check_data_fits(cfg: TrainConfig, image_size: int) -> None:
    """A synthetic set renders every image into memory (uint8): refuse one that cannot fit in RAM."""
    d = cfg.data
    if d.kind != "synthetic":  # RecordIO and ImageFolder decode per batch
        return
    size = d.size or image_size
    n = d.num_identities * d.images_per_identity
    check_fits({f"synthetic images ({n:,} at {size}×{size})": n * size * size * 3},
               "the synthetic training set", FIX, error=ConfigError)


def _weights_lower_bound(cfg: TrainConfig) -> int:
    """Parameters of the transformer blocks alone (qkv, proj and a 4× MLP: 12·dim² per block), from the
    preset and overrides: refuses absurd sizes before the meta build, whose time grows with the number
    of modules (a depth of 10⁷ would take hours to build even without memory)."""
    from petal_fast.models import SWIN_PRESETS, VIT_PRESETS
    vit = cfg.backbone.startswith("vit")
    table = VIT_PRESETS if vit else SWIN_PRESETS
    key = cfg.backbone if cfg.backbone in table else cfg.backbone.split("_", 1)[-1]
    fields = {**table[key], **cfg.backbone_overrides}
    dim = fields["embed_dim"]
    if vit:
        return 12 * fields["depth"] * dim * dim
    return sum(12 * depth * (dim * 2 ** stage) ** 2 for stage, depth in enumerate(fields["depths"]))


def _meta_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The model ``cfg`` describes, on the meta device (full_ft built as pretrain: the same shapes)."""
    from .model import build_training_model
    meta_cfg = dataclasses.replace(cfg, pretrained=None, mode="pretrain" if cfg.mode == "full_ft" else cfg.mode)
    try:
        with torch.device("meta"):
            return build_training_model(meta_cfg, num_classes, torch.device("meta"))
    except Exception as err:  # noqa: BLE001 - any failure to build is the configuration's
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        keys = ", ".join(f"{k}={v!r}" for k, v in cfg.backbone_overrides.items())
        where = f"backbone {cfg.backbone!r} with backbone_overrides {{{keys}}}" if keys else f"backbone {cfg.backbone!r}"
        raise ConfigError(f"the model this config describes does not build ({where}, rank={cfg.rank}, "
                          f"targets={list(cfg.targets)}): {type(err).__name__}: {first}") from None


def _activations_per_image(model: nn.Module, image_size: int, backbone: str) -> int:
    """Elements every leaf module outputs for one image (meta forward: shapes only)."""
    from petal_fast.backend import use_backend
    from petal_fast.models import PetalFace
    total = 0

    def hook(_module, inputs, output) -> None:
        nonlocal total
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        seen = {id(t) for t in inputs}  # Identity, eval-mode Dropout: the input itself, nothing new
        total += sum(t.numel() for t in outputs if isinstance(t, torch.Tensor) and id(t) not in seen)

    leaves = [m for m in model.backbone.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        images = torch.empty(2, 3, image_size, image_size, device="meta")  # 2: BatchNorm's least
        alpha = torch.empty(2, device="meta")
        model.eval()
        with torch.no_grad(), use_backend("reference"):  # plain torch ops: every one runs on meta
            if isinstance(model, PetalFace) and model.branches == 2:
                model.embedding(images, alpha)
            else:
                model.embedding(images)
    except Exception as err:  # noqa: BLE001 - the forward's shapes are the configuration's
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"the model this config describes fails on a {image_size}×{image_size} image "
                          f"(backbone {backbone!r}): {type(err).__name__}: {first}") from None
    finally:
        for h in handles:
            h.remove()
    return total // 2


def check_model_fits(cfg: TrainConfig, num_classes: int, image_size: int, device: torch.device,
                     world: int = 1) -> None:
    """Build the run's model on meta (a ConfigError if it does not build or run) and refuse it when its
    weights, gradients, AdamW state and one batch's activations exceed the device's memory (per
    process: a class-sharded head holds 1/world of the classes)."""
    check_fits({"transformer blocks' weights": _weights_lower_bound(cfg) * 4}, "this training run's backbone", FIX,
               device=str(device), error=ConfigError)
    model = _meta_model(cfg, num_classes)
    per_image = _activations_per_image(model, image_size, cfg.backbone)
    head = sum(p.numel() for p in model.head.parameters()) if getattr(model, "head", None) is not None else 0
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.sharded_head and world > 1:
        shard = -(-head // world)
        total, trainable, head = total - head + shard, trainable - head + shard, shard
    f32 = 4
    amp = cfg.amp in ("bf16", "fp16") or (cfg.amp == "auto" and device.type == "cuda")
    parts = {"backbone and adapter weights": (total - head) * f32,
             f"margin head ({num_classes:,} classes)": head * f32,
             "gradients and AdamW state": trainable * f32 * 3,
             f"activations (batch_size={cfg.batch_size})": per_image * cfg.batch_size * (2 if amp else f32)}
    check_fits(parts, "this training run", FIX, device=str(device), error=ConfigError)
