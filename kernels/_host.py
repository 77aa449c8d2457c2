"""Host-side launch arithmetic shared by the kernel launchers."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """Ceil division for grids and splits: ``triton.cdiv`` is a constexpr function, slow to call on the host."""
    return -(-a // b)


def direct(kernel):
    """The default kernel wrapper of the launchers: launch the kernel itself (a ``triton_op`` passes
    ``torch.library.wrap_triton`` instead, so tracing records each launch)."""
    return kernel
