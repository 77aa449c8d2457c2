"""Quality → α, PETALface's per-image branch weight (docs/design.md §1.2), with calibration.

    oriented (default):  α = clamp(0.5 + k · o · (s − τ), 0, 1)
    paper:               α = 0.5 + (s − τ)                      (released code: unclamped, unoriented)

``s`` is a quality source's raw value per image, ``o = +1`` if higher ``s`` means better quality
(resolution, feature norm) and ``−1`` if lower does (BRISQUE), so α grows with quality and the
high-quality branch gets more weight for better images. τ is calibrated on the training data
(median of ``s``), k is a slope (``calibrate`` can set it from the data's spread). ``mode="paper"``
exists only to load and evaluate released checkpoints; it ignores o and k, as the released code did.

Sources (``QualitySource``): ``BrisqueQuality``, ``ResolutionQuality`` (known original size),
``FeatureNormQuality`` (embedding norm, as AdaFace), ``CallableQuality`` (any function).
``QualityToAlpha`` holds a source, τ, k and the mode, and is saved with the model's state dict.
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch import nn

from petal_fast.ops._graph import value_check

MODES = ("oriented", "paper")


def alpha_from_quality(q: torch.Tensor, tau: float | torch.Tensor, slope: float | torch.Tensor = 1.0,
                       mode: str = "oriented", higher_is_better: bool = True) -> torch.Tensor:
    """α per image from quality ``q`` (same units as ``tau``).

    ``oriented``: ``clamp(0.5 + slope·o·(q − tau), 0, 1)``, ``o = 1 if higher_is_better else −1``.
    ``paper``: ``0.5 + (q − tau)``, unclamped, ignoring ``slope`` and ``higher_is_better``
    (the released PETALface code with raw BRISQUE scores).

    Undefined quality (NaN, e.g. from a custom source) counts as the worst: α = 0, the low-quality
    branch, with one warning giving the count. Infinite quality takes the limit of the oriented
    formula (BRISQUE's +inf for a degenerate image → 0); in ``paper`` mode any non-finite α becomes 0.
    α is always finite.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a tensor, got {type(q).__name__}")
    if not q.is_floating_point():
        q = q.double()
    # Checks that read values run where the values are on the host (CPU tensors, Python numbers); on a
    # GPU a host read would stall the stream every batch: there τ and the slope are checked by a
    # device-side assert and NaN quality is mapped to α = 0 without the counting warning. Traced
    # (torch.compile), QualityToAlpha and calibrate checked them when they were set.
    host = q.device.type == "cpu" and not torch.compiler.is_compiling()
    tau = torch.as_tensor(tau, dtype=q.dtype, device=q.device)
    if host and not bool(torch.all(torch.isfinite(tau))):
        raise ValueError(f"tau must be a finite number (a quality value), got {tau.tolist()}")
    if not host and not torch.compiler.is_compiling():
        value_check(torch.isfinite(tau).all(), "tau must be a finite number (a quality value)")
    undefined = torch.isnan(q)
    if host and bool(undefined.any()):
        warnings.warn(f"{int(undefined.sum())} of {q.numel()} quality values are NaN (undefined): treated as the "
                      "worst quality, α = 0", RuntimeWarning, stacklevel=2)
    if mode == "paper":
        alpha = 0.5 + (q - tau)
        return alpha.masked_fill(~torch.isfinite(alpha), 0.0)
    slope = torch.as_tensor(slope, dtype=q.dtype, device=q.device)
    if host and not bool(torch.all(torch.isfinite(slope) & (slope > 0))):
        raise ValueError(f"slope must be a finite number > 0 (orientation is set by higher_is_better), "
                         f"got {slope.tolist()}")
    if not host and not torch.compiler.is_compiling():
        value_check((torch.isfinite(slope) & (slope > 0)).all(), "slope must be a finite number > 0")
    sign = 1.0 if higher_is_better else -1.0
    return (0.5 + slope * sign * (q - tau)).clamp(0.0, 1.0).masked_fill(undefined, 0.0)


class QualitySource(nn.Module):
    """A per-image quality measure: ``forward(images, **context) -> (B,)`` raw values.

    ``higher_is_better`` orients it; ``default_slope`` is k when not calibrated from data;
    ``context`` lists the extra keyword inputs it needs (e.g. ``original_size``).
    """
    name: str = "source"
    higher_is_better: bool = True
    default_slope: float = 1.0
    context: tuple[str, ...] = ()


class BrisqueQuality(QualitySource):
    """BRISQUE score (``petal_fast.quality.brisque``), lower = better; 25 points move α by 0.5."""
    name, higher_is_better, default_slope = "brisque", False, 0.02

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from .brisque import brisque
        return brisque(images)


class ResolutionQuality(QualitySource):
    """log2 of each image's known original size (shorter side, pixels) before any upsampling.

    Needs ``original_size`` ((B,) or (B, 2) as H, W); each halving of resolution moves α by 0.5.
    """
    name, higher_is_better, default_slope, context = "resolution", True, 0.5, ("original_size",)

    def forward(self, images: torch.Tensor, original_size: torch.Tensor | None = None) -> torch.Tensor:
        if original_size is None:
            raise ValueError("resolution quality needs original_size=(B,) or (B, 2) tensor of the images' "
                             "sizes before upsampling")
        size = torch.as_tensor(original_size, device=images.device, dtype=torch.float64)
        if size.dim() == 2:
            size = size.min(dim=1).values
        if size.shape != (images.shape[0],):
            raise ValueError(f"original_size must be ({images.shape[0]},) or ({images.shape[0]}, 2), "
                             f"got {tuple(size.shape)}")
        if not bool(torch.all(size > 0)):
            raise ValueError("original_size must be positive")
        return torch.log2(size)


class FeatureNormQuality(QualitySource):
    """L2 norm of each image's embedding (AdaFace's quality proxy), higher = better.

    Pass ``embeddings=`` (B, D) to forward, or build it with ``encoder`` (images → embeddings).
    """
    name, higher_is_better, default_slope, context = "feature_norm", True, 0.05, ("embeddings",)

    def __init__(self, encoder: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        if embeddings is None:
            if self.encoder is None:
                raise ValueError("feature_norm quality needs embeddings=(B, D) or an encoder")
            embeddings = self.encoder(images)
        if embeddings.dim() != 2 or embeddings.shape[0] != images.shape[0]:
            raise ValueError(f"embeddings must be ({images.shape[0]}, D), got {tuple(embeddings.shape)}")
        return embeddings.detach().double().norm(dim=1)


class CallableQuality(QualitySource):
    """Any function ``fn(images, **context) -> (B,)`` as a source."""

    def __init__(self, fn: Callable[..., torch.Tensor], higher_is_better: bool = True,
                 default_slope: float = 1.0, name: str = "callable"):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn, self.higher_is_better, self.default_slope, self.name = fn, higher_is_better, default_slope, name
        params = inspect.signature(fn).parameters
        self.context = tuple(k for k in params if k != next(iter(params), None))

    def forward(self, images: torch.Tensor, **context: Any) -> torch.Tensor:
        return torch.as_tensor(self.fn(images, **context))


SOURCES = {"brisque": BrisqueQuality, "resolution": ResolutionQuality, "feature_norm": FeatureNormQuality}


def make_source(source: str | QualitySource | Callable[..., torch.Tensor]) -> QualitySource:
    """A source from its name, an instance, or any callable (oriented higher = better)."""
    if isinstance(source, QualitySource):
        return source
    if isinstance(source, str):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {tuple(SOURCES)}, a QualitySource or a callable, got {source!r}")
        return SOURCES[source]()
    if callable(source):
        return CallableQuality(source)
    raise TypeError(f"source must be a name, a QualitySource or a callable, got {type(source).__name__}")


class QualityToAlpha(nn.Module):
    """``alpha = module(images, **context)``: source → α in the chosen mode, as float32 (B,).

    τ and k are buffers (saved in the state dict); the mode and source name are extra state.
    Not differentiable: α is an input to PetalLinear, never trained through.
    """

    def __init__(self, source: str | QualitySource | Callable[..., torch.Tensor] = "brisque",
                 tau: float = 0.0, slope: float | None = None, mode: str = "oriented"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.source = make_source(source)
        self.mode = mode
        slope = self.source.default_slope if slope is None else float(slope)
        if not (math.isfinite(slope) and slope > 0):  # an infinite slope gives inf·0 = NaN at q = τ
            raise ValueError(f"slope must be a finite number > 0, got {slope}")
        if not math.isfinite(float(tau)):
            raise ValueError(f"tau must be a finite number (a quality value), got {tau}")
        self.register_buffer("tau", torch.tensor(float(tau), dtype=torch.float64))
        self.register_buffer("slope", torch.tensor(slope, dtype=torch.float64))
        self.register_buffer("calibrated", torch.tensor(False))

    def get_extra_state(self) -> dict:
        return {"mode": self.mode, "source": self.source.name}

    def set_extra_state(self, state: dict) -> None:
        if state.get("source") != self.source.name:
            raise ValueError(f"checkpoint was calibrated for source {state.get('source')!r}, "
                             f"this module uses {self.source.name!r}")
        if state.get("mode") not in MODES:
            raise ValueError(f"checkpoint has an unknown mode {state.get('mode')!r}")
        self.mode = state["mode"]

    def quality(self, images: torch.Tensor, **context: Any) -> torch.Tensor:
        """The source's raw values (B,) as float64."""
        with torch.no_grad():
            return self.source(images, **context).to(torch.float64)

    def alpha(self, q: torch.Tensor) -> torch.Tensor:
        """α from raw values ``q`` of this module's source."""
        alpha = alpha_from_quality(q.to(self.tau.device, torch.float64), self.tau, self.slope, self.mode,
                                   self.source.higher_is_better)
        f32 = torch.finfo(torch.float32)  # the paper's unclamped α must not overflow to ±inf in float32
        return alpha.clamp(f32.min, f32.max).float()

    def forward(self, images: torch.Tensor, **context: Any) -> torch.Tensor:
        return self.alpha(self.quality(images, **context)).to(images.device)

    def extra_repr(self) -> str:
        return (f"source={self.source.name}, mode={self.mode}, tau={self.tau.item():.4g}, "
                f"slope={self.slope.item():.4g}, calibrated={bool(self.calibrated)}")


def _split_batch(batch: Any, needs: tuple[str, ...]) -> tuple[torch.Tensor, dict]:
    """(images, context) from a batch: a tensor, a tuple/list (images first) or a dict."""
    if isinstance(batch, torch.Tensor):
        return batch, {}
    if isinstance(batch, dict):
        key = "images" if "images" in batch else "image"
        if key not in batch:
            raise ValueError(f"dict batches need an 'images' or 'image' key, got {sorted(batch)}")
        return batch[key], {k: batch[k] for k in needs if k in batch}
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], {}
    raise TypeError(f"cannot find images in a batch of type {type(batch).__name__}; pass a tensor, a "
                    "(images, ...) tuple, a dict with 'images', or batch_fn=")


def _batches(data: Any, batch_size: int) -> tuple[Iterable, int | None]:
    from torch.utils.data import DataLoader, Dataset
    if isinstance(data, torch.Tensor):
        return data.split(batch_size), math.ceil(data.shape[0] / batch_size)
    if isinstance(data, DataLoader):
        try:
            return data, len(data)
        except TypeError:
            return data, None
    if isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        try:
            return loader, len(loader)
        except TypeError:
            return loader, None
    raise TypeError(f"data must be a tensor batch, a Dataset or a DataLoader, got {type(data).__name__}")


@torch.no_grad()
def calibrate(source: str | QualitySource | Callable[..., torch.Tensor] | QualityToAlpha, data: Any,
              slope: float | str | None = None, mode: str = "oriented", batch_size: int = 64,
              max_batches: int | None = None, batch_fn: Callable[[Any], tuple[torch.Tensor, dict]] | None = None,
              device: torch.device | str | None = None, progress: bool = True) -> QualityToAlpha:
    """Calibrate τ = median of the source's raw values over ``data`` (tensor, Dataset or DataLoader).

    ``slope``: None → the source's default; a number; or ``"spread"`` → k = 0.8 / (q90 − q10) so
    the middle 80% of the data spans α ∈ [0.1, 0.9]. Returns a ``QualityToAlpha``; save it (or the
    model holding it) with ``state_dict()`` and restore with ``load_state_dict()``.
    """
    module = source if isinstance(source, QualityToAlpha) else QualityToAlpha(source, mode=mode)
    src = module.source
    batches, total = _batches(data, batch_size)
    if max_batches is not None:
        total = min(total, max_batches) if total is not None else max_batches
    from petal_fast.progress import progress as progress_bar
    values = []
    for i, batch in enumerate(progress_bar(batches, total=total, desc=f"calibrating {src.name}", disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        images, context = batch_fn(batch) if batch_fn is not None else _split_batch(batch, src.context)
        if device is not None:
            images = images.to(device)
        values.append(module.quality(images, **context).cpu())
    q = torch.cat(values) if values else torch.empty(0, dtype=torch.float64)
    if q.numel() == 0:
        raise ValueError("calibrate: data yielded no images")
    finite = torch.isfinite(q)
    if not bool(finite.any()):
        raise ValueError(f"calibrate: all {q.numel()} images have a non-finite quality (degenerate images, e.g. "
                         "blank or constant); calibrate on real training images")
    if not bool(finite.all()):  # degenerate images have no quality to calibrate on: τ from the others
        warnings.warn(f"calibrate: {int((~finite).sum())} of {q.numel()} images have a non-finite quality "
                      "(degenerate) and are left out of τ", RuntimeWarning, stacklevel=2)
        q = q[finite]
    module.tau.fill_(torch.quantile(q, 0.5).item())
    if slope == "spread":
        spread = (torch.quantile(q, 0.9) - torch.quantile(q, 0.1)).item()
        if not spread > 0:
            raise ValueError("calibrate: slope='spread' needs data whose quality varies (q90 == q10)")
        module.slope.fill_(0.8 / spread)
    elif slope is not None:
        if not (math.isfinite(float(slope)) and float(slope) > 0):
            raise ValueError(f"slope must be a finite number > 0, 'spread' or None, got {slope!r}")
        module.slope.fill_(float(slope))
    module.calibrated.fill_(True)
    return module
