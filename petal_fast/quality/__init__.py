"""petal_fast.quality — image quality on the device and the quality → α mapping (docs/design.md §1.2).

    from petal_fast.quality import brisque, calibrate, QualityToAlpha
    scores = brisque(images)                    # (B, C, H, W) in [0, 1] or uint8 → (B,), lower = better
    q2a = calibrate("brisque", train_images)    # τ = median score of the training data
    alpha = q2a(images)                         # clamp(0.5 + k·(τ − score), 0, 1)

Calling the package (``petal_fast.quality(alpha)``) raises a TypeError that names
``petal_fast.alpha_scope``, the context that hands α to PetalLinear layers.
"""
import sys
import types

# the BRISQUE stages live with the op (petal_fast.ops); still reachable as petal_fast.quality.ggd / resize / svr
from petal_fast.ops.brisque import ggd, resize, svr  # noqa: F401

from .alpha import (MODES, BrisqueQuality, CallableQuality, FeatureNormQuality, QualitySource, QualityToAlpha,
                    ResolutionQuality, alpha_from_quality, calibrate, make_source)
from .brisque import DegenerateImageWarning, brisque, brisque_features, check_images

__all__ = ["MODES", "BrisqueQuality", "CallableQuality", "FeatureNormQuality", "QualitySource", "QualityToAlpha",
           "ResolutionQuality", "DegenerateImageWarning", "alpha_from_quality", "brisque", "brisque_features",
           "calibrate", "check_images", "make_source"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        raise TypeError("petal_fast.quality is the image-quality package (brisque, calibrate, QualityToAlpha); "
                        "the context that hands α to PetalLinear layers is `with petal_fast.alpha_scope(alpha):` "
                        "(petal_fast.quality(alpha) was its earlier name and has been removed)")


sys.modules[__name__].__class__ = _CallableModule
