"""The fused PetalLinear op: the ``petal_fast::fused_petal_linear`` operator, dispatched by backend
(docs/design.md §1.1, §3).

    y = x Wᵀ + b + s·(1 − α_i)·D₁(x A_lrᵀ B_lrᵀ) + s·α_i·D₂(x A_hrᵀ B_hrᵀ)

Computed in the split-fused form: U = x A_catᵀ (M × 2r), scaled per row by c = [s(1−α), sα],
then ``y = b + x Wᵀ + (c ⊙ U) B_catᵀ`` with the expand in the base GEMM's accumulator.
Backward (W, b frozen, α an input): dU = dY·B_cat, dT = c ⊙ dU, dB = dYᵀ(c ⊙ U), dA = dTᵀx,
dX = dY·W + dT·A_cat. Saved for backward: x, U (M × 2r), the branch weights c (per image) and
the dropout seed — never an M×out tensor; dropout masks are regenerated from the seed.

Gradients: x, lora_A, lora_B always; α too when it requires grad, on every backend
(dy/dα_i = s·(branch_hr − branch_lr) summed over image i's rows and outputs, dropout applied).
Double backward through the fused backends raises; the reference backend is plain autograd.
Under torch.compile / torch.export the α cache below is bypassed (it is Python state) and α's
finiteness is checked inside the operator (``validate=True``: a ValueError on CPU, a device-side
assert on CUDA; see ``_graph.value_check``); in eager mode it is checked once per α tensor.
"""
from __future__ import annotations

import functools

import torch

from petal_fast.backend import resolve
from petal_fast.reference import petal_linear as reference_petal_linear

from ._graph import compiling, seed_tensor, triton_op_runs, value_check
from .petal_linear_library import OP, forward_impl, fused_petal_linear


def _concat(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A_cat (R × in) and B_cat (out × R), R = branches·r: both branches as one skinny GEMM each."""
    branches, r, k = lora_A.shape
    if branches == 1:
        # squeeze, not permute: its gradient is lora_B's canonical strides. permute's keeps stride r on
        # the size-1 dim, which autograd accepts but DDP does not ("grad strides do not match bucket
        # view strides": a copy per step and a warning).
        return lora_A.squeeze(0), lora_B.squeeze(0)
    return lora_A.reshape(branches * r, k), lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], branches * r)


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, alpha: torch.Tensor | None, dropout: float) -> None:
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
    if branches == 2:
        if alpha is None:
            raise ValueError("alpha is required for a two-branch PetalLinear: pass alpha=... or wrap the "
                             "call in `with petal_fast.quality(alpha):`")
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


_NO_SEED = torch.zeros(1, dtype=torch.int64)  # p = 0: the seed is unused


@functools.lru_cache(maxsize=None)
def _single_branch_weights(scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[[s]]: the one-branch weights are a constant per (scale, dtype, device)."""
    with torch.inference_mode(False):  # made once, maybe saved for backward later
        return branch_coefficients(None, 1, scale, dtype, device)


def _coefficients(alpha: torch.Tensor | None, branches: int, scale: float, dtype: torch.dtype,
                  device: torch.device, shared: dict | None) -> torch.Tensor:
    """``branch_coefficients`` after α's value check; with ``shared`` (an ``alpha_scope``'s dict: every
    layer of a forward pass gets the same α) both happen once per α version and scale, not per call."""
    if compiling():  # Python state is not traced: compute (α is checked inside the operator)
        return branch_coefficients(alpha, branches, scale, dtype, device)
    if branches == 1:
        return _single_branch_weights(float(scale), dtype, device)
    version = _version(alpha)
    if shared is None or version is None or (alpha.requires_grad and torch.is_grad_enabled()):
        # no scope, an inference tensor (no version counter), or dα wanted (weights in this graph)
        check_alpha_values(alpha)
        return branch_coefficients(alpha, branches, scale, dtype, device)
    if shared.get("version") != version:  # first layer, or α changed in place since
        check_alpha_values(alpha)
        shared.clear()
        shared["version"] = version
    key = (float(scale), dtype)
    if key not in shared:
        with torch.inference_mode(False):  # reused later, maybe by a step that saves it for backward
            shared[key] = branch_coefficients(alpha, branches, scale, dtype, device)
    return shared[key]


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


def branch_coefficients(alpha: torch.Tensor | None, branches: int, scale: float,
                        dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """(images, branches) per-image weights: [s(1−α), sα] for two branches, [[s]] for one."""
    if branches == 1:
        return torch.full((1, 1), float(scale), dtype=dtype, device=device)
    a = alpha.to(dtype)
    return torch.stack((scale * (1.0 - a), scale * a), dim=1).contiguous()


def petal_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, alpha: torch.Tensor | None = None, scale: float = 1.0,
                 dropout: float = 0.0, seed: int | torch.Tensor = 0, shared: dict | None = None) -> torch.Tensor:
    """Fused PetalLinear forward; differentiable in x, lora_A, lora_B and α (W, b frozen).

    x: (..., in); weight: (out, in); lora_A: (branches, r, in); lora_B: (branches, out, r);
    alpha: (images,) for two branches (rows_per_image = rows / images), ignored for one;
    seed: an int in [0, 2³¹) or a 1-element integer tensor (what a compiled graph should pass);
    shared: a dict that calls with the same α share (``petal_fast.alpha_scope`` gives its layers one):
    α's value check and branch weights are computed into it once instead of per call.
    """
    check_inputs(x, weight, bias, lora_A, lora_B, alpha, dropout)
    backend = resolve(x.device, OP)
    branches = lora_A.shape[0]
    if backend == "reference":
        if branches == 2 and not compiling():  # traced, the oracle checks nothing (no opaque op to do it)
            check_alpha_values(alpha)
        if isinstance(seed, torch.Tensor):
            seed = int(seed.item())
        return reference_petal_linear(x, weight, bias, lora_A, lora_B, alpha, scale, dropout, seed)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # the one explicit copy of a non-contiguous input
    coef_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    coef = _coefficients(alpha if branches == 2 else None, branches, scale, coef_dtype, x.device, shared)
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):  # the op is opaque to autocast: cast as F.linear would
        dtype = torch.get_autocast_dtype(x.device.type)
        x2 = x2.to(dtype)
    cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731  (.to costs ~1.5 µs)
    w, b, la, lb = cast(weight), cast(bias), cast(lora_A), cast(lora_B)
    a_cat, b_cat = _concat(la, lb)
    seed_t = seed_tensor(seed) if dropout > 0.0 else _NO_SEED
    traced = compiling()
    args = (x2, w, b, a_cat, b_cat, coef, float(dropout), seed_t)
    validate = traced and branches == 2
    if not traced and not (torch.is_grad_enabled() and (x2.requires_grad or la.requires_grad or lb.requires_grad
                                                        or coef.requires_grad)):
        # eager inference: the operator's body without the dispatcher, no autograd node, nothing saved
        y, _ = forward_impl(*args, backend)
    elif triton_op_runs(backend):
        y, _ = _triton_op().triton_petal_linear(*args, validate)  # Inductor sees its kernels
    else:  # interpreted Triton kernels cannot be traced: the opaque operator runs them
        y, _ = fused_petal_linear(*args, backend, validate)
    return y.view(*lead, weight.shape[0])


def _triton_op():
    """The triton_op module, imported on first use (it imports torch.library's Triton support)."""
    from . import petal_linear_triton_library
    return petal_linear_triton_library
