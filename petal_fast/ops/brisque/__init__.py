"""BRISQUE (Mittal et al. 2012), batched, equal to the ``brisque`` PyPI package (docs/design.md §1.2):

    score = SVR(scale([f(Y), f(resize_half(Y))])),   lower = better quality

Everything of the op lives here, under one name:

- :mod:`.dispatch`: :func:`brisque_op` — input checks, backend choice, eager / compiled routes;
- :mod:`.library`: the ``torch.library`` operator ``petal_fast::fused_brisque`` with its fake, the
  input contract and the degenerate-image rule;
- :mod:`.triton_library`: the ``triton_op`` ``petal_fast::triton_brisque``;
- :mod:`.backends`: backend name → (moments, score): :mod:`.torch_impl`, the C++ op
  (``csrc/brisque.cpp``), the Triton kernel (``kernels/brisque.py``);
- :mod:`.torch_impl` (luminance, the fused stage), :mod:`.resize` (OpenCV's half-size bicubic),
  :mod:`.ggd` (AGGD fits), :mod:`.svr` (the package's trained SVR).

The oracle is ``petal_fast.reference.brisque``; the public functions are
``petal_fast.quality.brisque`` / ``brisque_features``.
"""
from .dispatch import brisque_op
from .library import DEGENERATE_SCORE, MIN_SIZE, DegenerateImageWarning, check_images, fused_brisque

__all__ = ["DEGENERATE_SCORE", "DegenerateImageWarning", "MIN_SIZE", "brisque_op", "check_images", "fused_brisque"]
