"""BRISQUE as a PyTorch operator (``torch.library``), with the input contract it enforces.

    petal_fast::fused_brisque(images, features, backend) -> (B,) scores | (B, 36) features, float64

``backend``: "torch" | "cpp" | "triton" (a constant in a traced graph). Per image: luminance Y;
the fused stage (local Gaussian mean/variance → MSCN map → its four neighbour products → five
moment sums of each map: the backend's ``moments``, :mod:`.backends`); AGGD fits from the sums
(:mod:`.ggd`); the same at OpenCV's half-size bicubic resize (:mod:`.resize`); the trained RBF ε-SVR
of the installed ``brisque`` distribution (:mod:`.svr`). The cpp backend runs all of it per image in
one C++ call (its ``score``).

Float images outside [0, 1] raise ValueError from inside the operator (eager code even in a
compiled graph), so the value scan never breaks a graph. Degenerate images (no local contrast:
BRISQUE undefined, NaN) score :data:`DEGENERATE_SCORE` with one :class:`DegenerateImageWarning`.
"""
from __future__ import annotations

import warnings

import torch
from torch._guards import detect_fake_mode

from petal_fast import _ext

from .._graph import value_check, wrap_kwargs
from . import ggd, svr
from .backends import implementation

OP = "brisque_score"  # the C++ op whose presence means the cpp backend can run
NAME = "petal_fast::fused_brisque"
MIN_SIZE = 16
DEGENERATE_SCORE = float("inf")  # the score of an image without local contrast: the worst quality


class DegenerateImageWarning(UserWarning):
    """Some images have no local contrast (constant, blank): BRISQUE is undefined, scored as the worst."""


def check_images(images: torch.Tensor, value_range: tuple[float, float] | None = None) -> None:
    """Raise TypeError/ValueError naming ``images`` for anything outside the input contract.

    ``value_range``: the (min, max) of the values if already known (the C++ path measures it in its
    pass over the images); otherwise float images are scanned here.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 (0..255) or floating point in [0, 1], got {images.dtype}")
    if images.dim() != 4:
        hint = " (add the batch dimension: images[None])" if images.dim() == 3 else ""
        raise ValueError(f"images must be batched (B, C, H, W), got shape {tuple(images.shape)}{hint}")
    b, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"images must have C = 1 (grayscale) or 3 (RGB) channels in dim 1, got C = {c} "
                         f"(shape {tuple(images.shape)}; channels-last images need .permute(0, 3, 1, 2))")
    if h < MIN_SIZE or w < MIN_SIZE:
        raise ValueError(f"images must be at least {MIN_SIZE}×{MIN_SIZE} pixels, got {h}×{w}")
    if images.is_floating_point() and b > 0:
        lo, hi = value_range if value_range is not None else map(float, torch.aminmax(images))
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise ValueError(
                f"images: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]. "
                "Images normalised to [-1, 1] (as the released PETALface code feeds its IQA): pass (x + 1) / 2; "
                "images in [0, 255]: pass x / 255 or x.to(torch.uint8); mean/std-normalised images: undo the "
                "normalisation (x * std + mean) first.")


def degenerate_to_worst(scores: torch.Tensor) -> torch.Tensor:
    """Scores of degenerate images (NaN: undefined features) → :data:`DEGENERATE_SCORE`; one warning
    with their number. Shared by every backend, after its features and SVR. Traced (a triton_op in a
    compiled graph: fake tensors) or on a GPU the scores are replaced the same, but no warning counts
    them (counting reads a value on the host: a synchronisation per batch)."""
    bad = ~torch.isfinite(scores)
    if detect_fake_mode() is not None or scores.device.type != "cpu":  # no count: it would be a host read
        return scores.masked_fill(bad, DEGENERATE_SCORE)
    n = int(bad.sum())
    if n:
        warnings.warn(f"BRISQUE: {n} of {scores.numel()} images are degenerate (constant or flat: no local "
                      "contrast, BRISQUE is undefined); scored +inf, the worst quality, so their α is 0 "
                      "(the low-quality branch)", DegenerateImageWarning, stacklevel=4)
        scores = scores.masked_fill(bad, DEGENERATE_SCORE)
    return scores


def check_values(images: torch.Tensor) -> None:
    """Float images in [0, 1]: on CPU ``check_images``' ValueError with the range found; on CUDA, eager or
    traced, a device-side assert (``_graph.value_check``: no host read); traced on CPU nothing."""
    if not images.is_floating_point():
        return
    if detect_fake_mode() is None and images.device.type == "cpu":
        check_images(images)
    else:
        value_check(((images >= 0) & (images <= 1)).all(), "images: float images must lie in [0, 1]")


def brisque_impl(images: torch.Tensor, features: bool, backend: str, wrap=None) -> torch.Tensor:
    """The operator's body (of the Triton triton_op too, with ``wrap`` = its kernel wrapper)."""
    if images.shape[0] == 0:
        return images.new_empty((0, 36) if features else (0,), dtype=torch.float64)
    images = images.contiguous()
    moments, score = implementation(backend)
    if score is not None:  # the whole pipeline per image in one call, the value range measured on the way
        scores, feats, ranges = score(images)
        if images.is_floating_point():
            check_images(images, (ranges[:, 0].min().item(), ranges[:, 1].max().item()))
        return feats if features else degenerate_to_worst(scores)
    check_values(images)
    m = moments(images, **wrap_kwargs(wrap))  # both scales fitted in one vectorised call
    f = ggd.scale_features(m.flatten(0, 1)).view(m.shape[0], 36)
    return f if features else degenerate_to_worst(svr.predict(f, svr.load_model(str(images.device))))


@torch.library.custom_op(NAME, mutates_args=())
def fused_brisque(images: torch.Tensor, features: bool, backend: str) -> torch.Tensor:
    """The operator behind ``brisque`` / ``brisque_features``: (B, C, H, W) → (B,) scores or (B, 36)
    features, float64, values checked inside."""
    return brisque_impl(images, features, backend)


@fused_brisque.register_fake
def _(images, features, backend):
    return images.new_empty((images.shape[0], 36) if features else (images.shape[0],), dtype=torch.float64)


@_ext.when_loaded
def _raw_kernel_fakes() -> None:
    """Fake implementations of the raw C++ kernels, so they trace when called directly."""
    if not _ext.has_op(OP):
        return

    @torch.library.register_fake("petal_fast::brisque_moments")
    def _(images, scales):
        return images.new_empty((images.shape[0], scales, 5, 5), dtype=torch.float64)

    @torch.library.register_fake("petal_fast::brisque_score")
    def _(images, f_min, f_max, support, coef, rho, gamma):
        b = images.shape[0]
        return (images.new_empty((b,), dtype=torch.float64), images.new_empty((b, 36), dtype=torch.float64),
                images.new_empty((b, 2), dtype=torch.float64))
