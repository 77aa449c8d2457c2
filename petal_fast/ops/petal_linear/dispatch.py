"""The fused PetalLinear op, dispatched by backend (docs/design.md §1.1, §3).

    y = x Wᵀ + b + s·(1 − α_i)·D₁(x A_lrᵀ B_lrᵀ) + s·α_i·D₂(x A_hrᵀ B_hrᵀ)

Computed in the split-fused form (:mod:`.library`): U = x A_catᵀ (M × 2r), the expand
``(c ⊙ U) B_catᵀ`` in the base GEMM's accumulator, c = [s(1−α), sα] per row. Saved for backward: x, U,
α and the dropout seed — never an M × out tensor; masks are regenerated from (seed, stream).

Gradients: x, lora_A, lora_B; α, W and b too when they require grad, on every backend.
Which route runs:

- eager (no tracing): inference calls the operator body directly; training goes through a plain
  ``autograd.Function`` (``EagerPetalLinear``) — no custom-op dispatch on the hot path;
- ``torch.compile``: the Triton backend's ``triton_op`` (Inductor sees its kernels), otherwise the
  opaque operator; α's finiteness is checked inside the operator (``validate=True``);
- ``torch.export`` (and so ONNX export): the torch composition written out of ATen operations, so an
  exported program of any model holding PetalLinear layers needs no petal_fast operator to run.

α's value check (finite) runs eagerly once per α tensor and version (the layers of a forward pass share
one α: checked once per pass). On CUDA it is a device-side assert: no host synchronisation.
"""
from __future__ import annotations

import weakref

import torch

from petal_fast.backend import resolve
from petal_fast.reference import petal_linear as reference_petal_linear

from .._graph import compiling, no_functorch, seed_tensor, triton_op_runs, unused_seed, value_check
from .library import OP, EagerPetalLinear, forward_impl, fused_petal_linear
from .torch_impl import branch_coefficients, concat, row_scale


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, alpha: torch.Tensor | None, dropout: float, scale: float) -> None:
    """Raise ValueError/TypeError naming the argument for every malformed input."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    out_f, in_f = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x: last dimension must be in_features={in_f}, got shape {tuple(x.shape)}")
    if lora_A.dim() != 3 or lora_A.shape[2] != in_f or lora_A.shape[1] < 1:
        raise ValueError(f"lora_A must be (branches, rank>=1, {in_f}), got {tuple(lora_A.shape)}")
    branches, rank = lora_A.shape[:2]
    if tuple(lora_B.shape) != (branches, out_f, rank):
        raise ValueError(f"lora_B must be {(branches, out_f, rank)}, got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if not (isinstance(scale, (int, float)) and abs(float(scale)) < float("inf")):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if branches == 2:
        if alpha is None:
            raise ValueError("alpha is required for a two-branch PetalLinear: pass alpha=... or wrap the "
                             "call in `with petal_fast.alpha_scope(alpha):`")
        if not isinstance(alpha, torch.Tensor):
            raise TypeError(f"alpha must be a tensor, got {type(alpha).__name__}")
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a floating-point tensor, got {alpha.dtype}")
        if alpha.device != x.device:
            raise ValueError(f"alpha is on {alpha.device} but x is on {x.device}")
        rows = x.numel() // in_f if in_f else x.numel()
        if alpha.dim() != 1 or (alpha.numel() == 0 and rows > 0):
            raise ValueError(f"alpha must be 1-D with one value per image, got shape {tuple(alpha.shape)}")
        if alpha.numel() and rows % alpha.numel():
            raise ValueError(f"alpha has {alpha.numel()} values but x has {rows} rows: the number of rows "
                             "must be a multiple of the number of images (rows_per_image = rows / len(alpha))")
    elif branches != 1:
        raise ValueError(f"branches must be 1 or 2, got {branches}")


def check_alpha_values(alpha: torch.Tensor) -> None:
    """ValueError (CPU) or a device-side assert (CUDA: no host sync) for a non-finite α; eager only
    (a traced graph checks inside the operator, ``validate=True``)."""
    value_check(torch.isfinite(alpha).all(), "petal_linear: alpha contains non-finite values")


_last_checked: tuple = (None, None)  # (weakref to α, its version): the α whose values were last checked


def _check_alpha_once(alpha: torch.Tensor) -> None:
    """α's value check, skipped when this very α, unchanged since (same version), was checked last: the
    layers of a forward pass all get the same α, so it is checked once per pass, not once per layer (on
    CUDA three kernel launches each). An inference tensor (no version counter) is checked every time."""
    global _last_checked
    version = _version(alpha)
    ref, checked_version = _last_checked
    if version is not None and ref is not None and ref() is alpha and checked_version == version:
        return
    check_alpha_values(alpha)
    if version is not None:
        _last_checked = (weakref.ref(alpha), version)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def _composition(x, weight, bias, lora_A, lora_B, alpha, scale):
    """Inference as ATen operations (what ``torch.export`` records): y = x Wᵀ + b + (c ⊙ x A_catᵀ) B_catᵀ."""
    branches = lora_A.shape[0]
    coef = branch_coefficients(alpha, branches, scale, x.dtype, x.device)
    a_cat, b_cat = concat(lora_A, lora_B)
    u = x @ a_cat.T
    y = torch.nn.functional.linear(x, weight, bias)
    return y + row_scale(u, coef) @ b_cat.T


def petal_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, alpha: torch.Tensor | None = None, scale: float = 1.0,
                 dropout: float = 0.0, seed: int | torch.Tensor = 0, stream: int = 0) -> torch.Tensor:
    """Fused PetalLinear forward; differentiable in x, lora_A, lora_B, α, W and b.

    x: (..., in); weight: (out, in); lora_A: (branches, r, in); lora_B: (branches, out, r);
    alpha: (images,) for two branches (rows_per_image = rows / images), ignored for one;
    seed: an int in [0, 2³¹) or a 1-element integer tensor, best on x's device (what the modules pass);
    stream: the layer's dropout stream (layers sharing a seed draw different masks).
    """
    check_inputs(x, weight, bias, lora_A, lora_B, alpha, dropout, scale)
    branches = lora_A.shape[0]
    alpha = alpha if branches == 2 else None
    p = float(dropout)
    if torch.compiler.is_exporting():  # plain ATen operations: the exported program runs anywhere
        if p > 0.0:
            raise ValueError("petal_linear: export a model in eval mode (dropout is a training-time op)")
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y = _composition(x2, *_cast((weight, bias, lora_A, lora_B), dtype), alpha, scale)
        return y.view(*x.shape[:-1], weight.shape[0])
    backend = resolve(x.device, OP)
    if backend != "reference":
        no_functorch("petal_linear")
    if backend == "reference":
        if alpha is not None and not compiling():  # traced, the oracle checks nothing (no opaque op to do it)
            check_alpha_values(alpha)
        if isinstance(seed, torch.Tensor):
            seed = int(seed.reshape(-1)[0])
        return reference_petal_linear(x, weight, bias, lora_A, lora_B, alpha, scale, p, seed, stream)
    lead, out_f = x.shape[:-1], weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):  # the op is opaque to autocast: cast as F.linear would
        dtype = torch.get_autocast_dtype(x.device.type)
    if x2.dtype != dtype:  # (no-op calls skipped: the host path is part of the cost, §3.5)
        x2 = x2.to(dtype)
    if not x2.is_contiguous():  # the one explicit copy of a non-contiguous input
        x2 = x2.contiguous()
    w, b, la, lb = _cast((weight, bias, lora_A, lora_B), dtype)
    seed_t = seed_tensor(seed, x.device) if p > 0.0 else unused_seed(x.device)
    traced = compiling()
    if alpha is not None and not traced:
        _check_alpha_once(alpha)
    args = (x2, w, b, la, lb, alpha, float(scale), p, seed_t, int(stream))
    if not traced:
        if torch.is_grad_enabled() and (x2.requires_grad or la.requires_grad or lb.requires_grad or w.requires_grad
                                        or (b is not None and b.requires_grad)
                                        or (alpha is not None and alpha.requires_grad)):
            y = EagerPetalLinear.apply(*args, backend)
        else:  # inference: the body itself, no autograd node, nothing saved
            y, _ = forward_impl(*args, backend)
    elif triton_op_runs(backend):
        y, _ = _triton_op().triton_petal_linear(*args, alpha is not None)  # Inductor sees its kernels
    else:  # interpreted Triton kernels cannot be traced: the opaque operator runs them
        y, _ = fused_petal_linear(*args, backend, alpha is not None)
    return y.view(*lead, out_f)


def _cast(tensors, dtype):
    """Each tensor in ``dtype`` (None stays None; no ``.to`` call for a tensor already there: it costs host time)."""
    if all(t is None or t.dtype == dtype for t in tensors):
        return tensors
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def _triton_op():
    """The triton_op module, imported on first use (it imports torch.library's Triton support)."""
    from . import triton_library
    return triton_library
