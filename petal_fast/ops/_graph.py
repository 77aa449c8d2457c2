"""What the ops need to stay inside one graph under ``torch.compile`` / ``torch.export``.

- ``value_check``: validation that needs tensor *values* (α finite, labels in range). On CPU
  tensors it is the plain ``ValueError`` it always was (the values are on the host: no sync); on
  CUDA tensors it is ``torch._assert_async`` (a device-side assert: no host sync). It only ever runs
  eagerly: in eager mode before the op, and in a traced graph inside the opaque operator bodies
  (``validate=True``), so a traced graph holds no data-dependent branch and no graph break.
  (Not ``torch._assert_async`` in the traced graph itself: Inductor's CPU code can fuse it into an
  OpenMP-parallel loop, where the failure terminates the process instead of raising.) Shape and
  dtype checks stay plain Python errors: they depend on sizes only, which Dynamo guards on.
- ``seed_tensor``: dropout seeds travel as a 1-element int64 CPU tensor, not a Python int, so a
  new seed per step is new data for a compiled graph rather than a new constant (a recompile).
"""
from __future__ import annotations

import torch


def compiling() -> bool:
    """True while Dynamo traces (torch.compile, torch.export), False in eager mode."""
    return torch.compiler.is_compiling()


def value_check(ok: torch.Tensor, message: str, sync: bool | None = None) -> None:
    """Fail with ``message`` unless the boolean 0-d tensor ``ok`` is true (call it eagerly only).

    ``sync``: raise a host-side ``ValueError`` (reads the value: a device sync on CUDA); default:
    only for CPU tensors. Otherwise ``torch._assert_async`` (a RuntimeError naming ``message``,
    raised when the device reaches it).
    """
    if sync is None:
        sync = ok.device.type == "cpu"
    if not sync:
        torch._assert_async(ok, message)
    elif not bool(ok):
        raise ValueError(message)


def seed_tensor(seed: int | torch.Tensor) -> torch.Tensor:
    """The dropout seed as the ops take it: a 1-element int64 tensor on the CPU."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point():
            raise ValueError(f"seed must be an int or a 1-element integer tensor, got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(1).to("cpu", torch.int64)
    return torch.tensor([int(seed)], dtype=torch.int64)


def draw_seed() -> torch.Tensor:
    """A fresh dropout seed in [0, 2³¹) from torch's CPU generator (traceable: no ``.item()``)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
