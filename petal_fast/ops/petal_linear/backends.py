"""PetalLinear's backends: name → (forward, backward), one signature for all of them.

    forward(x, W, b, lora_A, lora_B, α, s, p, seed, stream[, wrap])           -> (y, U)
    backward(dy, x, W, lora_A, lora_B, α, U, s, p, seed, stream, need_x[, wrap]) -> (dX | None, dA, dB)

- ``torch``: :mod:`.torch_impl`; ``cpp``: the C++ ops ``petal_linear_fwd`` / ``petal_linear_bwd``
  (``csrc/petal_linear.cpp``). Both take the layer's tensors as they are and the seed as a host int
  (:func:`_host` reads it); the branch weights and the concatenated layouts are built inside.
- ``triton``: the launchers in ``kernels/petal_linear.py``, imported on first use (a machine without
  Triton never imports it), given the design in force (:func:`triton_design`) as an argument.

``reference`` is not a table entry: the dispatcher calls ``petal_fast.reference.petal_linear``.
"""
from __future__ import annotations

import functools
from typing import Callable

from torch import Tensor

from petal_fast import _ext, settings
from petal_fast.definitions.dropout import stream_seed

from .._graph import has_values
from . import torch_impl


def host_seed(seed: Tensor, stream: int) -> int | Tensor:
    """The layer's seed as the CPU backends take it: an int read on the host for a real CPU tensor (no
    device to wait for), a tensor otherwise (the torch composition hashes it where it is)."""
    if seed.device.type == "cpu" and has_values(seed):
        return stream_seed(int(seed.item()), stream)  # a 1-element tensor: one read, no view or index op
    return stream_seed(seed, stream)  # hashed as a tensor: on the device, or traced (fake: no value)


def _host(fwd: Callable, bwd: Callable) -> tuple[Callable, Callable]:
    """(forward, backward) of the table's signature around a CPU pair that takes the seed as a host int."""
    def forward(x, weight, bias, lora_A, lora_B, alpha, scale, p, seed, stream):
        s = host_seed(seed, stream) if p > 0.0 else 0
        return fwd(x, weight.contiguous(), None if bias is None else bias.contiguous(), lora_A, lora_B, alpha,
                   float(scale), float(p), s)

    def backward(dy, x, weight, lora_A, lora_B, alpha, u, scale, p, seed, stream, need_x):
        s = host_seed(seed, stream) if p > 0.0 else 0
        return bwd(dy, x, weight.contiguous(), lora_A, lora_B, alpha, float(scale), u, float(p), s, need_x)

    return forward, backward


def _torch() -> tuple[Callable, Callable]:
    return _host(torch_impl.forward, torch_impl.backward)


CPU_PATH_CODES = {"auto": -1, "whole": 0, "blocked": 1}  # the C++ ops' ``path`` argument


def cpu_knobs() -> tuple[int, int]:
    """(path, block_rows) arguments of this thread's C++ calls, from the ``cpu_path`` / ``cpu_block_rows``
    settings in force (an ``override`` block of this thread, else the process's)."""
    current = settings.current()
    return CPU_PATH_CODES[current.cpu_path], current.cpu_block_rows


def _cpp() -> tuple[Callable, Callable]:
    fwd, bwd = _ext.op("petal_linear_fwd"), _ext.op("petal_linear_bwd")
    return _host(lambda *args: fwd(*args, *cpu_knobs()), lambda *args: bwd(*args, *cpu_knobs()))


def triton_design() -> str | None:
    """The Triton design this thread's calls use: a ``use_design`` block's, else the ``triton_design``
    setting in force (None: the GPU generation's default). Imports the kernels: Triton calls only."""
    from petal_fast.kernels.petal_linear_config import forced_design
    return forced_design() or settings.current().triton_design


def _triton() -> tuple[Callable, Callable]:
    from petal_fast.kernels import petal_linear as launch

    # ``design``: what the forward of this call used (captured by the eager route, whose backward autograd
    # may run on another thread); otherwise this thread's choice
    def forward(*args, design: str | None = None, **kwargs):
        return launch.forward(*args, design=design or triton_design(), **kwargs)

    def backward(*args, design: str | None = None, **kwargs):
        return launch.backward(*args, design=design or triton_design(), **kwargs)

    return forward, backward


BACKENDS: dict[str, Callable[[], tuple[Callable, Callable]]] = {"torch": _torch, "cpp": _cpp, "triton": _triton}


@functools.cache
def implementation(backend: str) -> tuple[Callable, Callable]:
    """(forward, backward) of a resolved non-reference backend, built on first use."""
    return BACKENDS[backend]()
