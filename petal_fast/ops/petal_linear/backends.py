"""PetalLinear's backends: name → (forward, backward), one signature for all of them.

    forward(x, W, b, lora_A, lora_B, α, s, p, seed, stream[, wrap])           -> (y, U)
    backward(dy, x, W, lora_A, lora_B, α, U, s, p, seed, stream, need_x[, wrap]) -> (dX | None, dA, dB)

- ``torch``: :mod:`.torch_impl`; ``cpp``: the C++ ops ``petal_linear_fwd`` / ``petal_linear_bwd``
  (``csrc/petal_linear.cpp``). Both take both branches concatenated (A_cat, B_cat), the per-image
  branch weights and a host seed; :func:`_host` adapts them.
- ``triton``: the launchers in ``kernels/petal_linear.py``, imported on first use (a machine without
  Triton never imports it), given the ``triton_design`` setting as an argument.

``reference`` is not a table entry: the dispatcher calls ``petal_fast.reference.petal_linear``.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor

from petal_fast import _ext, settings
from petal_fast.definitions.dropout import stream_seed

from .._graph import has_values
from . import torch_impl


def concat(lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor]:
    """A_cat (R × in) and B_cat (out × R), R = branches·r: the CPU backends' layout of both branches."""
    branches, r, k = lora_A.shape
    if branches == 1:
        return lora_A[0], lora_B[0]
    return lora_A.reshape(branches * r, k), lora_B.permute(1, 0, 2).reshape(lora_B.shape[1], branches * r)


def split_b(db_cat: Tensor, branches: int) -> Tensor:
    """dB_cat (out × R) → (branches, out, r) with lora_B's canonical strides (DDP compares them literally)."""
    if branches == 1:
        return db_cat.unsqueeze(0)
    return db_cat.reshape(db_cat.shape[0], branches, -1).permute(1, 0, 2).contiguous()


def host_seed(seed: Tensor, stream: int) -> int | Tensor:
    """The layer's seed as the CPU backends take it: an int read on the host for a real CPU tensor (no
    device to wait for), a tensor otherwise (the torch composition hashes it where it is)."""
    if seed.device.type == "cpu" and has_values(seed):
        return stream_seed(int(seed.reshape(-1)[0]), stream)
    return stream_seed(seed, stream)  # hashed as a tensor: on the device, or traced (fake: no value)


def _cpu_args(lora_A: Tensor, lora_B: Tensor, alpha: Tensor | None, scale: float, x: Tensor):
    a_cat, b_cat = concat(lora_A, lora_B)
    coef_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    coef = torch_impl.branch_coefficients(alpha, lora_A.shape[0], scale, coef_dtype, x.device)
    return a_cat.contiguous(), b_cat.contiguous(), coef


def _host(fwd: Callable, bwd: Callable) -> tuple[Callable, Callable]:
    """(forward, backward) of the table's signature around a CPU-layout pair (A_cat, B_cat, coef, int seed)."""
    def forward(x, weight, bias, lora_A, lora_B, alpha, scale, p, seed, stream):
        a_cat, b_cat, coef = _cpu_args(lora_A, lora_B, alpha, scale, x)
        s = host_seed(seed, stream) if p > 0.0 else 0
        return fwd(x, weight.contiguous(), None if bias is None else bias.contiguous(), a_cat, b_cat, coef,
                   float(p), s)

    def backward(dy, x, weight, lora_A, lora_B, alpha, u, scale, p, seed, stream, need_x):
        a_cat, b_cat, coef = _cpu_args(lora_A, lora_B, alpha, scale, x)
        s = host_seed(seed, stream) if p > 0.0 else 0
        dx, da_cat, db_cat = bwd(dy, x, weight.contiguous(), a_cat, b_cat, coef, u, float(p), s, need_x)
        return dx, da_cat.reshape(lora_A.shape), split_b(db_cat, lora_A.shape[0])

    return forward, backward


def _torch() -> tuple[Callable, Callable]:
    return _host(torch_impl.forward, torch_impl.backward)


_cpu_tuned: tuple[str, int] | None = None  # the (cpu_path, cpu_block_rows) last handed to the C++ library


def apply_cpu_tuning() -> None:
    """Hand the ``cpu_path`` / ``cpu_block_rows`` settings to the C++ PetalLinear when they changed since
    the last call (the library keeps its copy; settings.py knows nothing of it). Runs before each C++ call."""
    global _cpu_tuned
    current = settings.current()
    knobs = (current.cpu_path, current.cpu_block_rows)
    if knobs != _cpu_tuned and _ext.has_op("petal_linear_cpu_tuning"):
        _ext.op("petal_linear_cpu_tuning")(*knobs)
        _cpu_tuned = knobs


def _cpp() -> tuple[Callable, Callable]:
    fwd, bwd = _ext.op("petal_linear_fwd"), _ext.op("petal_linear_bwd")

    def tuned_fwd(*args):
        apply_cpu_tuning()
        return fwd(*args)

    def tuned_bwd(*args):
        apply_cpu_tuning()
        return bwd(*args)

    return _host(tuned_fwd, tuned_bwd)


def _triton() -> tuple[Callable, Callable]:
    from petal_fast.kernels import petal_linear as launch

    def forward(*args, **kwargs):
        return launch.forward(*args, design=settings.current().triton_design, **kwargs)

    def backward(*args, **kwargs):
        return launch.backward(*args, design=settings.current().triton_design, **kwargs)

    return forward, backward


BACKENDS: dict[str, Callable[[], tuple[Callable, Callable]]] = {"torch": _torch, "cpp": _cpp, "triton": _triton}


@functools.cache
def implementation(backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) of a resolved non-reference backend, built on first use."""
    return BACKENDS[backend]()
