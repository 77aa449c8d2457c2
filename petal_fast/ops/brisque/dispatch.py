"""The BRISQUE op: ``petal_fast::fused_brisque`` dispatched by backend (docs/design.md §1.2, §3).

    score = SVR(scale([f(Y), f(resize_half(Y))])),   lower = better quality (typically 0 … 100)

``brisque_op(images, features)`` checks the input contract once (types and shapes here; the values
of float images inside the operator, so a compiled graph holds no data-dependent branch), resolves
the backend, and runs the operator (``torch`` / ``cpp`` / ``triton``; eagerly its body directly, without
custom-op dispatch: ``ops/_eager.py``) or, when ``reference`` is asked for, the literal float64
oracle ``petal_fast.reference.brisque``. The public functions are
``petal_fast.quality.brisque`` / ``brisque_features``.
"""
from __future__ import annotations

import torch

from petal_fast.backend import resolve
from petal_fast.reference import brisque as reference_brisque  # the user-selectable `reference` backend

from .._eager import eager
from .._graph import triton_op_runs
from . import svr
from .library import OP, brisque_impl, check_images, degenerate_to_worst, fused_brisque

SUPPORTED = ("reference", "torch", "cpp", "triton")


def brisque_op(images: torch.Tensor, features: bool) -> torch.Tensor:
    """(B, C, H, W) uint8 or float in [0, 1] → (B,) float64 scores, or (B, 36) features if ``features``."""
    check_images(images, value_range=(0.0, 1.0))  # shape and dtype here; the values inside the operator
    backend = resolve(images.device, OP, supported=SUPPORTED)
    if backend != "reference" and eager(images):  # the operator's body without custom-op dispatch
        return brisque_impl(images, features, backend)
    if triton_op_runs(backend):  # the Triton kernel visible to torch.compile
        from .triton_library import triton_brisque
        return triton_brisque(images, features)
    if backend != "reference":
        return fused_brisque(images, features, backend)
    check_images(images)  # the oracle is plain torch: its values are scanned here
    if images.shape[0] == 0:
        return images.new_empty((0, 36) if features else (0,), dtype=torch.float64)
    if features:
        return reference_brisque.brisque_features(images)
    return degenerate_to_worst(reference_brisque.brisque(images, svr.load_model(str(images.device))))
