"""The margin loss (CosFace, ArcFace, combined, AdaFace) that never holds a B×C tensor: :func:`margin_loss`.

docs/design.md §1.3. With z_ij = s·cos θ_ij and t_i = s·f(cos θ_iy) the margined target
logit (``petal_fast.ops.margin_loss.per_row.target_logit``), the loss is split as

    lse_i  = log( exp t_i + Σ_{j≠y_i} exp z_ij ),     zsum_i = t_i + Σ_{j≠y_i} z_ij
    loss_i = lse_i − (1 − ε)·t_i − (ε/C)·zsum_i       (ε: label smoothing)

The two sums over j ≠ y_i and the target cosine cos θ_iy = ⟨ê_i, ŵ_{y_i}⟩ are the fused core
(the ``petal_fast::fused_margin_loss`` operator: online log-sum-exp over class tiles forward, tiles recomputed backward,
on the torch / cpp / triton backends; the target rows' gradient is added into dW in place). The
rest is B-long torch differentiated by autograd: the margin function with the chosen gradient
convention (``exact`` or ``straight_through``) and the final combination. Everything
accumulates in fp32 (fp64 for fp64 inputs).

Backward recomputes the class tiles: the gradient of a tile needs the row's final log-sum-exp, so
a class-chunked forward cannot emit dW in the same pass (the comparison with a row-block direct
form: docs/notes.md). Recompute keeps ``reduction="none"`` and arbitrary upstream gradients exact,
and holds nothing between the passes.

Partial FC (``sample_rate < 1``): each call keeps every positive class plus a uniform sample of the
negatives, k = min(C, max(⌈sample_rate·C⌉, B)) classes in all (:func:`partial_fc_sample`); the loss is
the softmax over the kept classes and dW is nonzero only on their rows. k depends on sizes only, so
the sampling compiles into the graph (``fullgraph=True``, dynamic batch) with no data-dependent shape.
"""
from __future__ import annotations

import math

import torch

from petal_fast.backend import resolve
from petal_fast.definitions.margin_loss import ADAFACE_H, GRADS, REDUCTIONS, resolve_margins
from petal_fast.reference import margin_loss as reference_margin_loss  # the user-selectable `reference` backend

from .._eager import eager
from .._graph import compiling, functorch_active, no_functorch, triton_op_runs, value_check
from .library import OP, EagerMarginLoss, fused_margin_loss
from .partial_fc import partial_fc_sample
from .per_row import adaface_zhat, combine, reduce, target_logit


def margin_loss_core(e: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, scale: float,
               backend: str, validate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse over non-targets, logit sum over non-targets, target cosine) on contiguous inputs. Eagerly the
    operator bodies run directly (``ops/_eager.py``); traced, the Triton backend runs through its
    triton_op (torch.compile sees the kernels), the others through the opaque operator."""
    if not triton_op_runs(backend):
        # The C++ and torch cores take one dtype and accumulate in fp32 anyway: 16-bit inputs (bf16
        # embeddings against fp32 centres under torch.autocast / amp) enter as fp32; the cast is
        # differentiable, so each gradient comes back in its input's dtype.
        dtype = torch.promote_types(e.dtype, w.dtype)
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        e, w = e.to(dtype), w.to(dtype)
    args = (e.contiguous(), w.contiguous(), labels.long().contiguous(), float(scale))
    if eager(*args[:3]):  # the same bodies without custom-op dispatch (values were checked before)
        return EagerMarginLoss.apply(*args, backend)
    if triton_op_runs(backend):
        from .triton_library import triton_margin_loss
        return triton_margin_loss(*args, validate)
    return fused_margin_loss(*args, backend, validate)


def check_tensors(embeddings, weight, labels, num_classes: int | None = None) -> None:
    """TypeError/ValueError naming the argument for malformed tensors: the one check of the op's
    inputs. ``num_classes`` bounds the labels when ``weight`` is a shard of a larger class set.

    Types and shapes are plain Python errors (sizes only). The values (labels in range, finite
    embeddings): a ``ValueError`` with the offending range on CPU tensors (already on the host);
    on CUDA a device-side assert (``value_check``: no host sync); in a traced graph inside the
    operator (``margin_loss_core(validate=True)``).
    """
    if not isinstance(embeddings, torch.Tensor) or not embeddings.is_floating_point():
        raise TypeError(f"embeddings must be a floating-point tensor, got {getattr(embeddings, 'dtype', type(embeddings))}")
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {getattr(weight, 'dtype', type(weight))}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if embeddings.dim() != 2 or embeddings.shape[1] < 1:
        raise ValueError(f"embeddings must be (batch, embedding_dim), got {tuple(embeddings.shape)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must be (num_classes, embedding_dim), got {tuple(weight.shape)}")
    if weight.shape[1] != embeddings.shape[1]:
        raise ValueError(f"embedding_dim mismatch: embeddings have D={embeddings.shape[1]} but weight has "
                         f"D={weight.shape[1]}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be 1-D with one label per embedding (batch={embeddings.shape[0]}), "
                         f"got shape {tuple(labels.shape)}")
    if embeddings.device != weight.device or labels.device != embeddings.device:
        raise ValueError(f"embeddings ({embeddings.device}), weight ({weight.device}) and labels "
                         f"({labels.device}) must be on one device")
    if compiling() or functorch_active() or not labels.numel():  # traced: checked inside the operator
        return
    classes = weight.shape[0] if num_classes is None else num_classes
    in_range = f"labels must be in [0, num_classes={classes})"
    finite = "embeddings contain non-finite values (NaN or inf)"
    if labels.device.type != "cpu":
        value_check(((labels >= 0) & (labels < classes)).all(), in_range)
        value_check(torch.isfinite(embeddings).all(), finite)
        return
    lo, hi = (int(v) for v in torch.aminmax(labels))
    if lo < 0 or hi >= classes:
        raise ValueError(f"{in_range}, got values in [{lo}, {hi}]")
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError(finite)


def check_settings(scale: float = 64.0, label_smoothing: float = 0.0, sample_rate: float = 1.0,
                   grad: str = "exact", reduction: str = "mean") -> None:
    """ValueError naming the setting for every invalid number or name (plain Python: no tensors).
    The margin heads call it once at construction; the op on every call."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if grad not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {grad!r}")
    check_reduction(reduction)


def check_reduction(reduction: str) -> None:
    """The one setting a margin head takes per call (the rest are checked at construction)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_inputs(embeddings, weight, labels, scale: float = 64.0, label_smoothing: float = 0.0,
                 sample_rate: float = 1.0, grad: str = "exact", num_classes: int | None = None,
                 reduction: str = "mean") -> None:
    """Everything :func:`margin_loss` checks: the tensors, then the settings (eager only:
    ``torch.compile(dynamic=True)`` may trace the numbers as symbolic floats)."""
    check_tensors(embeddings, weight, labels, num_classes)
    if not compiling():
        check_settings(scale, label_smoothing, sample_rate, grad, reduction)


def margin_loss(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        loss: str = "cosface", margins: tuple[float, ...] | None = None, scale: float = 64.0,
                        grad: str = "exact", label_smoothing: float = 0.0, reduction: str = "mean",
                        norm_mean: torch.Tensor | float = 20.0, norm_std: torch.Tensor | float = 100.0,
                        h: float = ADAFACE_H, sample_rate: float = 1.0,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Margin softmax cross entropy of embeddings (B×D) against class centres ``weight`` (C×D).

    ``loss``: cosface | arcface | combined (``margins=(m1, m2, m3)``) | adaface (``margins=(m,)``,
    with the already-updated moving averages ``norm_mean`` μ and ``norm_std`` σ). ``grad``: exact |
    straight_through. Differentiable in embeddings and weight. fp16/bf16 inputs are accumulated in
    fp32 and give an fp32 loss.
    """
    check_inputs(embeddings, weight, labels, scale, label_smoothing, sample_rate, grad, reduction=reduction)
    return margin_loss_unchecked(embeddings, weight, labels, loss, margins, scale, grad, label_smoothing,
                                         reduction, norm_mean, norm_std, h, sample_rate, generator)


def margin_loss_unchecked(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                  loss: str = "cosface", margins: tuple[float, ...] | None = None,
                                  scale: float = 64.0, grad: str = "exact", label_smoothing: float = 0.0,
                                  reduction: str = "mean", norm_mean: torch.Tensor | float = 20.0,
                                  norm_std: torch.Tensor | float = 100.0, h: float = ADAFACE_H,
                                  sample_rate: float = 1.0,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`margin_loss` on inputs that already passed :func:`check_inputs` (a head that
    checked them itself, so that one step checks once)."""
    margins = resolve_margins(loss, margins)
    labels = labels.long()
    if sample_rate < 1.0:
        index, labels = partial_fc_sample(labels, weight.shape[0], sample_rate, generator)
        weight = weight.index_select(0, index)
    backend = resolve(embeddings.device, OP)
    if backend != "reference":
        no_functorch("margin_loss")
    if backend == "reference":
        return reference_margin_loss.margin_loss(embeddings, weight, labels, loss, margins, scale, grad,
                                                    label_smoothing, reduction, norm_mean, norm_std, h)
    lse_nt, zsum_nt, cos_t = margin_loss_core(embeddings, weight, labels, scale, backend, validate=compiling())
    zhat = None
    if loss == "adaface":
        zhat = adaface_zhat(embeddings.detach().to(cos_t.dtype).norm(dim=1), norm_mean, norm_std, h)
    t = target_logit(cos_t, loss, margins, scale, grad, zhat)
    return reduce(combine(lse_nt, zsum_nt, t, weight.shape[0], label_smoothing), reduction)
