"""The margin loss (CosFace, ArcFace, combined, AdaFace; docs/design.md §1.3), fused so that the
B × C logits never exist:

    lse_i  = log(exp t_i + Σ_{j≠y_i} exp z_ij),    zsum_i = t_i + Σ_{j≠y_i} z_ij
    loss_i = lse_i − (1 − ε)·t_i − (ε/C)·zsum_i    (z_ij = s·cos θ_ij, t_i the margined target logit)

Everything of the op lives here, under one name:

- :mod:`.dispatch`: :func:`margin_loss` — input checks, backend choice, the core and the B-long rest;
- :mod:`.library`: the ``torch.library`` operators ``petal_fast::fused_margin_loss`` (and
  ``_backward``): the fused core (the two sums over j ≠ y_i and the target cosine), with fakes and
  autograd, and the eager ``EagerMarginLoss``;
- :mod:`.triton_library`: the ``triton_op`` pair ``petal_fast::triton_margin_loss`` (``_backward``);
- :mod:`.backends`: backend name → (forward, backward): :mod:`.torch_impl`, the C++ ops
  (``csrc/margin_loss.cpp``), the Triton launchers (``kernels/margin_loss.py``);
- :mod:`.per_row`: the margin functions and the combination on B-long vectors;
- :mod:`.partial_fc`: Partial FC class sampling.

The oracle is ``petal_fast.reference.margin_loss``; the modules are ``petal_fast.nn.MarginSoftmaxLoss``
(``nn/margin_loss.py``) and ``ShardedMarginSoftmaxLoss`` (``nn/margin_loss_sharded.py``).
"""
from .dispatch import (OP, check_inputs, check_reduction, check_settings, check_tensors, margin_loss,
                       margin_loss_core, margin_loss_unchecked)
from .library import fused_margin_loss, fused_margin_loss_backward
from .partial_fc import partial_fc_count, partial_fc_sample

__all__ = ["OP", "check_inputs", "check_reduction", "check_settings", "check_tensors", "fused_margin_loss",
           "fused_margin_loss_backward", "margin_loss", "margin_loss_core", "margin_loss_unchecked",
           "partial_fc_count", "partial_fc_sample"]
