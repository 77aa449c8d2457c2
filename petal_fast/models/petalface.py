"""The assembled face-recognition models: a backbone with a margin-softmax head, and PETALface.

PETALface (WACV 2025): images → per-image quality score → α ∈ [0, 1] → frozen backbone whose target
linears (``attn.qkv``) are two-branch :class:`~petal_fast.nn.PetalLinear` layers

    y = x Wᵀ + b + s·(1 − α_i)·D₁(x A_lrᵀ B_lrᵀ) + s·α_i·D₂(x A_hrᵀ B_hrᵀ)

and whose feature Linear carries a single-branch LoRA → 512-d embedding → margin head (training)
or L2-normalised embedding (inference). Only the adapters and the head are trained.

Parameter share: at the paper's size and rank 8 the adapters are 1,130,496 (qkv, two branches) +
311,296 (feature LoRA) = 1,441,792 parameters, 0.670% of the 215,108,560 of the adapted backbone.
The paper's abstract quotes 0.48%; the released configuration gives 0.670%.

To reproduce the released checkpoints' embeddings exactly, build with ``paper_compat=True`` (the
shifted-window mask is not applied, as in the release) and ``alpha_mode="paper"``; the defaults
apply the mask and use the oriented, bounded quality → α mapping (docs/design.md §1.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from petal_fast.nn import PetalLinear, inject_petal
from petal_fast.nn.context import alpha_scope

from .presets import SWIN_PRESETS, VIT_PRESETS, face_swin, face_vit

QualitySource = Union[str, float, Callable[[torch.Tensor], torch.Tensor], None]


def build_backbone(name: str, **overrides: Any) -> nn.Module:
    """``"petalface"``/``"small"``/``"tiny"`` (or ``"swin_<preset>"``) → face Swin; ``"vit_t"``, ``"vit_s"``,
    ``"vit_b"``, ``"vit_tiny"`` → face ViT."""
    if name in SWIN_PRESETS:
        return face_swin(name, **overrides)
    if name.startswith("swin_") and name[5:] in SWIN_PRESETS:
        return face_swin(name[5:], **overrides)
    if name in VIT_PRESETS:
        return face_vit(name, **overrides)
    if name.startswith("vit_") and name[4:] in VIT_PRESETS:
        return face_vit(name[4:], **overrides)
    raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(SWIN_PRESETS)} (face Swin) or "
                     f"{sorted(VIT_PRESETS)} (face ViT)")


def _embedding_size(backbone: nn.Module) -> int:
    size = getattr(backbone, "embedding_size", None)
    if not isinstance(size, int):
        raise TypeError(f"backbone {type(backbone).__name__} must expose an integer `embedding_size`")
    return size


class FaceModel(nn.Module):
    """A face backbone and (when ``num_classes`` is given) a margin-softmax head.

    ``forward(images, labels)`` returns the mean margin loss; ``forward(images)`` the raw embeddings.
    ``embed(images)`` gives L2-normalised, optionally flip-summed embeddings for evaluation.
    """

    def __init__(self, backbone: Union[str, nn.Module] = "petalface", num_classes: int | None = None,
                 loss: Union[str, Sequence[float]] = "cosface", margins: Sequence[float] | None = None,
                 loss_scale: float = 64.0, grad: str = "exact", head_kwargs: dict[str, Any] | None = None,
                 paper_compat: bool | None = None) -> None:
        super().__init__()
        if isinstance(backbone, str):
            if paper_compat is not None and backbone.startswith("vit"):
                raise ValueError("paper_compat concerns the face Swin's shifted windows; the ViT has none")
            backbone = build_backbone(backbone, **({} if paper_compat is None else {"paper_compat": paper_compat}))
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a preset name or an nn.Module, got {type(backbone).__name__}")
        self.backbone = backbone
        self.embedding_size = _embedding_size(backbone)
        self.head: nn.Module | None = None
        if num_classes is not None:
            if not isinstance(num_classes, int) or num_classes < 2:
                raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
            from petal_fast.nn.margin_loss import MarginSoftmaxLoss
            if not isinstance(loss, str):  # margins given directly: (m1, m2, m3) of the combined loss
                loss, margins = "combined", tuple(loss)
            self.head = MarginSoftmaxLoss(self.embedding_size, num_classes, loss=loss, margins=margins,
                                          scale=loss_scale, grad=grad, **(head_kwargs or {}))

    def embedding(self, images: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        """Raw (unnormalised) backbone embeddings; ``alpha`` is unused by a model without PETAL layers."""
        return self.backbone(images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                alpha: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.embedding(images, alpha)
        if labels is None:
            return emb
        if self.head is None:
            raise ValueError("labels were given but the model has no margin head (build it with num_classes=...)")
        return self.head(emb, labels)

    def embed(self, images: torch.Tensor, flip: bool = True, normalize: bool = True) -> torch.Tensor:
        """Evaluation embeddings: the image's embedding plus its mirror's (``flip``), L2-normalised.

        The image and its mirror go through the backbone as one batch (each with its own α). Call
        ``model.eval()`` first (dropout off, BatchNorm running statistics); wrap in
        ``torch.inference_mode()`` when no gradients are needed.
        """
        b = images.shape[0]
        batch = torch.cat([images, images.flip(-1)]) if flip else images
        emb = self.embedding(batch)
        if flip:
            emb = emb[:b] + emb[b:]
        return F.normalize(emb, dim=-1) if normalize else emb

    def parameter_report(self) -> "ParameterReport":
        """Frozen / adapter / other trainable parameters of the backbone, and the head's size."""
        two, one, adapter_ids = 0, 0, set()
        for _, m in self.backbone.named_modules():
            if isinstance(m, PetalLinear):
                n = m.lora_A.numel() + m.lora_B.numel()
                adapter_ids.update({id(m.lora_A), id(m.lora_B)})
                if m.branches == 2:
                    two += n
                else:
                    one += n
        frozen = other = 0
        for p in self.backbone.parameters():
            if id(p) in adapter_ids:
                continue
            if p.requires_grad:
                other += p.numel()
            else:
                frozen += p.numel()
        # Two-branch layers are the quality-weighted targets; single-branch ones the (feature) LoRA.
        adapters = {"petal": two, "lora": one}
        head = sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0
        return ParameterReport(frozen=frozen, adapters=adapters, other_trainable=other, head=head)


@dataclass
class ParameterReport:
    """Parameter counts of the backbone with its adapters (the head is counted apart)."""

    frozen: int
    adapters: dict[str, int] = field(default_factory=dict)
    other_trainable: int = 0
    head: int = 0

    @property
    def trainable(self) -> int:
        return sum(self.adapters.values()) + self.other_trainable

    @property
    def total(self) -> int:
        return self.frozen + self.trainable

    @property
    def share(self) -> float:
        """Trainable backbone parameters as a fraction of all backbone parameters."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:,}" for k, v in self.adapters.items())
        return (f"trainable {self.trainable:,} ({parts}; other {self.other_trainable:,}) of {self.total:,} "
                f"backbone parameters ({100 * self.share:.3f}%); frozen {self.frozen:,}; head {self.head:,}")


def _quality_module(source: QualitySource, alpha_mode: str, quality_kwargs: dict[str, Any]) -> Callable | None:
    """Turn ``quality=`` into images → α (B,). Names become a :class:`petal_fast.quality.QualityToAlpha`."""
    if source is None or callable(source):
        return source
    if isinstance(source, (int, float)) and not isinstance(source, bool):
        value = float(source)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"a constant quality α must be in [0, 1], got {value}")
        return lambda images: images.new_full((images.shape[0],), value, dtype=torch.float32)
    if isinstance(source, str):
        from petal_fast.quality import QualityToAlpha
        return QualityToAlpha(source, mode=alpha_mode, **quality_kwargs)
    raise TypeError(f"quality must be a measure name, a constant α, a callable images -> alpha or None; "
                    f"got {type(source).__name__}")


def _images_of(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict) and "images" in batch:
        return batch["images"]
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}")


class _Batches(torch.utils.data.IterableDataset):
    """Already-batched images for ``calibrate`` (a DataLoader with batch_size=None yields them as they are)."""

    def __init__(self, batches: Iterable[torch.Tensor]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


class PetalFace(FaceModel):
    """PETALface: quality-weighted two-branch LoRA on a frozen face backbone (see the module docstring).

    ``backbone``: a preset name (``"petalface"`` is the paper's Swin) or a module exposing
    ``embedding_size`` and ``feature_linear`` (the dotted name of its feature Linear).
    ``targets``: linears that become two-branch PetalLinear (``branches=1`` makes them plain LoRA and
    drops α). ``feature_lora``: a single-branch LoRA on the feature Linear, as the paper.
    ``quality``: ``"brisque"`` (default), another measure of :mod:`petal_fast.quality`, a callable
    images → α (B,), a constant α, or ``None`` (α must then be passed to ``forward``).
    ``alpha_mode``: how scores become α (``"oriented"`` default; ``"paper"`` is the released mapping).
    Named measures see the images mapped from ``input_range`` to [0, 1] (the released code fed its IQA
    [−1, 1] images, which petal_fast's BRISQUE rejects); a callable sees the images as given. The
    mapping's τ/k (``quality_to_alpha``) are saved with the model: calibrate them with
    :meth:`calibrate_quality` on training images.
    """

    def __init__(self, backbone: Union[str, nn.Module] = "petalface", num_classes: int | None = None, rank: int = 8,
                 scale: float = 1.0, dropout: float = 0.1, targets: Sequence[str] | str = ("attn.qkv",),
                 feature_lora: bool = True, feature_rank: int | None = None, branches: int = 2,
                 quality: QualitySource = "brisque", alpha_mode: str = "oriented",
                 quality_kwargs: dict[str, Any] | None = None, loss: Union[str, Sequence[float]] = "cosface",
                 margins: Sequence[float] | None = None, loss_scale: float = 64.0, grad: str = "exact",
                 head_kwargs: dict[str, Any] | None = None, paper_compat: bool | None = None,
                 input_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        super().__init__(backbone, num_classes, loss, margins, loss_scale, grad, head_kwargs, paper_compat)
        finite = len(input_range) == 2 and all(math.isfinite(v) for v in input_range)
        if not (finite and input_range[1] > input_range[0]):
            raise ValueError(f"input_range must be (low, high), finite numbers with high > low, got {input_range!r}")
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.rank, self.branches, self.alpha_mode = rank, branches, alpha_mode
        inject_petal(self.backbone, list(targets) if not isinstance(targets, str) else targets, rank=rank,
                     scale=scale, dropout=dropout, branches=branches, freeze_base=True)
        if feature_lora:
            name = getattr(self.backbone, "feature_linear", None)
            if not isinstance(name, str):
                raise TypeError(f"feature_lora=True needs backbone {type(self.backbone).__name__} to name its "
                                "feature Linear in `feature_linear`")
            inject_petal(self.backbone, name, rank=feature_rank or rank, scale=scale, dropout=dropout, branches=1,
                         freeze_base=False)
        self.quality_to_alpha = _quality_module(quality, alpha_mode, quality_kwargs or {}) if branches == 2 else None

    def unit_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images mapped from ``input_range`` to [0, 1], the quality measures' input contract."""
        lo, hi = self.input_range
        return ((images.detach().float() - lo) / (hi - lo)).clamp_(0.0, 1.0)

    def alpha(self, images: torch.Tensor) -> torch.Tensor:
        """Per-image quality weight α (B,), no gradient."""
        from petal_fast.quality import QualityToAlpha
        measure = self.quality_to_alpha
        if measure is None:
            raise ValueError("this PetalFace has no quality measure (quality=None): pass alpha= explicitly")
        with torch.no_grad():
            named = isinstance(measure, QualityToAlpha)
            alpha = measure(self.unit_images(images)) if named else measure(images.detach())
        if not isinstance(alpha, torch.Tensor) or alpha.shape != (images.shape[0],):
            raise ValueError(f"the quality measure must return α of shape ({images.shape[0]},), got "
                             f"{getattr(alpha, 'shape', type(alpha).__name__)}")
        return alpha.to(images.device)

    def calibrate_quality(self, images: Union[torch.Tensor, Iterable[Any]], **kwargs: Any) -> None:
        """Calibrate τ (and optionally k, ``slope="spread"``) of the quality → α mapping on training
        images: a (N, 3, H, W) tensor or an iterable of batches (tensors, ``(images, labels)`` or dicts
        with ``"images"``), in the model's ``input_range``. See :func:`petal_fast.quality.calibrate`."""
        from petal_fast.quality import QualityToAlpha, calibrate
        if not isinstance(self.quality_to_alpha, QualityToAlpha):
            raise ValueError("calibrate_quality needs a named quality measure (quality='brisque', …)")
        if isinstance(images, torch.Tensor):
            images = [self.unit_images(b) for b in images.split(kwargs.pop("batch_size", 64))]
        else:
            images = (self.unit_images(_images_of(b)) for b in images)
        calibrate(self.quality_to_alpha, torch.utils.data.DataLoader(_Batches(images), batch_size=None), **kwargs)

    def embedding(self, images: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        if self.branches == 2 and alpha is None:
            alpha = self.alpha(images)
        elif self.branches == 2 and (not isinstance(alpha, torch.Tensor) or alpha.dim() != 1
                                     or alpha.shape[0] != images.shape[0]):
            # PetalLinear shares rows among len(α) images: fewer values would silently cover several images each
            raise ValueError(f"alpha must hold one value per image, shape ({images.shape[0]},); got "
                             f"{tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__}")
        with alpha_scope(alpha if self.branches == 2 else None):  # α, and one dropout seed for the pass
            return self.backbone(images)
