"""PetalLinear, the quality-weighted two-branch LoRA layer's op (docs/design.md §1.1):

    y = x Wᵀ + b + s·(1 − α_i)·D₁(x A_lrᵀ B_lrᵀ) + s·α_i·D₂(x A_hrᵀ B_hrᵀ)

Everything of the op lives here, under one name:

- :mod:`.dispatch`: :func:`petal_linear` — input checks, backend choice, the eager / compiled /
  exported routes;
- :mod:`.library`: the ``torch.library`` operators ``petal_fast::fused_petal_linear`` (and
  ``_backward``) with their fake implementations and autograd, and the eager ``EagerPetalLinear``;
- :mod:`.triton_library`: the ``triton_op`` pair ``petal_fast::triton_petal_linear`` (``_backward``);
- :mod:`.backends`: backend name → (forward, backward): :mod:`.torch_impl`, the C++ ops
  (``csrc/petal_linear.cpp``), the Triton launchers (``kernels/petal_linear.py``);
- :mod:`.torch_impl`: the torch composition.

The oracle is ``petal_fast.reference.petal_linear``; the module is ``petal_fast.nn.PetalLinear``.
"""
from .dispatch import check_inputs, petal_linear
from .library import fused_petal_linear, fused_petal_linear_backward

__all__ = ["check_inputs", "fused_petal_linear", "fused_petal_linear_backward", "petal_linear"]
