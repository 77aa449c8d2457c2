"""When an op may run its operator bodies directly instead of through ``torch.library`` dispatch.

A custom operator call goes Python → the C++ dispatcher → its autograd kernel → back to Python, host
time that can exceed the work of a small PETALface shape (docs/design.md §3.5). Eagerly, with
plain tensors, nothing needs that path: the ops then call the same bodies through a
``torch.autograd.Function`` (gradients, saved tensors and the double-backward error as the operator
registers them). Everything that must see an operator keeps it: Dynamo (``torch.compile``,
``torch.export``), ``make_fx`` / AOTAutograd (a dispatch mode), functorch transforms (vmap, grad),
``__torch_function__`` modes, and tensor subclasses (fake, functional, DTensor, ...).
"""
from __future__ import annotations

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors: torch.Tensor) -> bool:
    """True when the operator bodies may run directly on ``tensors`` (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(type(t) in _PLAIN for t in tensors)
