"""BRISQUE's backends: name → (moments, score), one of the two None.

    moments(images[, wrap]) -> (B, 2 scales, 5 maps, 5 sums) float64
        the fused stage (local Gaussian mean and variance → MSCN map → its four neighbour products →
        five moment sums per map) at the luminance Y and at OpenCV's half-size resize of Y
    score(images) -> (scores, features, per-image [min, max]) | None
        the whole pipeline per image in one call, where a backend has it (cpp)

``torch``: :mod:`.torch_impl`; ``triton``: ``kernels/brisque.py`` (imported on first use) after the
torch luminance and resize; ``cpp``: the C++ op ``brisque_score`` (``csrc/brisque.cpp``). The AGGD fits (:mod:`.ggd`) and the SVR (:mod:`.svr`) follow ``moments``.
``reference`` is not a table entry: the dispatcher calls ``petal_fast.reference.brisque``.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from petal_fast import _ext

from . import resize, svr, torch_impl


def _two_scales(per_scale: Callable) -> Callable:
    """moments() from a per-scale fused stage (gray (B, H, W) float64 → (B, 5, 5))."""
    def moments(images: torch.Tensor, **wrap) -> torch.Tensor:
        gray = torch_impl.luminance(images)
        half = resize.resize_half(gray).contiguous()
        return torch.stack([per_scale(gray, **wrap), per_scale(half, **wrap)], dim=1)
    return moments


def _cpu_input(images: torch.Tensor) -> torch.Tensor:
    if images.is_floating_point() and images.dtype not in (torch.float32, torch.float64):
        return images.float()
    return images


def _cpp_score(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m = svr.load_model("cpu")
    return _ext.op("brisque_score")(_cpu_input(images), m.f_min, m.f_max, m.support, m.coef, m.rho, m.gamma)


def _torch() -> tuple[Callable, None]:
    return _two_scales(torch_impl.mscn_moments), None


def _cpp() -> tuple[None, Callable]:
    return None, _cpp_score


def _triton() -> tuple[Callable, None]:
    from petal_fast.kernels import brisque as launch
    return _two_scales(launch.mscn_moments), None


BACKENDS: dict[str, Callable[[], tuple[Callable | None, Callable | None]]] = {"torch": _torch, "cpp": _cpp, "triton": _triton}


@functools.cache
def implementation(backend: str) -> tuple[Callable | None, Callable | None]:
    """(moments, score) of a resolved non-reference backend, built on first use."""
    return BACKENDS[backend]()
