"""What the ops need to stay inside one graph under ``torch.compile`` / ``torch.export``.

- ``value_check``: validation that needs tensor *values* (α finite, labels in range). On CPU
  tensors it is a plain ``ValueError`` (the values are on the host: no sync); on
  CUDA tensors it is ``torch._assert_async`` (a device-side assert: no host sync). It only ever runs
  eagerly: in eager mode before the op, and in a traced graph inside the opaque operator bodies
  (``validate=True``), so a traced graph holds no data-dependent branch and no graph break.
  (Not ``torch._assert_async`` in the traced graph itself: Inductor's CPU code can fuse it into an
  OpenMP-parallel loop, where the failure terminates the process instead of raising.) Shape and
  dtype checks stay plain Python errors: they depend on sizes only, which Dynamo guards on.
- ``launchable``: how a ``triton_op`` body launches a kernel (``torch.library.wrap_triton``, so
  AOTAutograd turns each launch into a graph node Inductor schedules).
- ``no_functorch``: a clear error for a fused op called inside a ``torch.func`` transform.
- ``seed_tensor`` / ``draw_seed``: dropout seeds travel as a 1-element int64 tensor on x's device, not
  a Python int (a new seed per step is new data for a compiled graph rather than a new constant, a
  recompile) and not a CPU tensor (copied to a GPU it would synchronise the host).
"""
from __future__ import annotations

import functools

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.library import wrap_triton

from petal_fast.backend import triton_interpreting


def compiling() -> bool:
    """True while Dynamo traces (torch.compile, torch.export), False in eager mode."""
    return torch.compiler.is_compiling()


def functorch_active() -> bool:
    """True inside a ``torch.func`` transform (grad, vmap, jacrev, jvp, functional_call under grad, …);
    False while Dynamo traces (it handles transforms itself, and must not trace this query)."""
    return not compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def no_functorch(op: str) -> None:
    """A clear error for a fused op under a ``torch.func`` transform (its operators have no functorch
    rules; torch's own message would speak of an autograd.Function's setup_context or of data-dependent
    control flow); the ``reference`` backend is plain autograd and supports them."""
    if functorch_active():
        raise NotImplementedError(f"{op}: torch.func transforms (grad, vmap, jacrev, jvp, ...) are not supported by the "
                           "fused backends; run it with petal_fast.use_backend('reference') (plain autograd) inside "
                           "the transform, or use loss.backward() / torch.autograd.grad")


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
    elif has_values(ok) and not bool(ok):
        raise ValueError(message)


def has_values(t: torch.Tensor) -> bool:
    """False for the fake tensors of a traced triton_op body (they hold no values). A plain tensor
    answers without the fake-mode lookup: the eager α check runs per layer call."""
    return type(t) is torch.Tensor or detect_fake_mode() is None


class _NoLaunch:
    """``kernel[grid](...)`` that does nothing: an interpreted kernel met with fake tensors."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def launchable(kernel):
    """``wrap_triton(kernel)``: inside a ``triton_op`` body, a launch that tracing records as a graph node.

    Under the Triton interpreter (``TRITON_INTERPRET=1``) a kernel is no JIT function: wrap_triton
    hands it back unwrapped, and with fake tensors (shape propagation, opcheck) the launch is skipped
    — it only writes outputs the body allocated. (A graph compiled under the interpreter must not
    reach here: the dispatchers use the opaque operators then.)
    """
    wrapped = wrap_triton(kernel)
    if wrapped is kernel and detect_fake_mode() is not None:
        return _NoLaunch()
    return wrapped


def wrap_kwargs(wrap) -> dict:
    """How an operator body passes a triton_op's kernel wrapper to its backend function: ``wrap=`` for
    the Triton launchers inside a triton_op, nothing otherwise (the other backends take no wrapper)."""
    return {} if wrap is None else {"wrap": wrap}


def real_tensors(make):
    """For a cached constructor of constant tensors (tables, trained models): the tensors are real even
    when the first call happens while a triton_op body is traced on fake tensors (a cached fake
    tensor would poison every later call)."""
    @functools.wraps(make)
    def wrapper(*args, **kwargs):
        with unset_fake_temporarily():
            return make(*args, **kwargs)
    return wrapper


def graph_constant(t: torch.Tensor) -> torch.Tensor:
    """A cached real tensor as a triton_op body may use it: itself in eager mode; traced (fake tensors),
    a fresh ``torch.tensor`` of its values, which the trace records as a constant of the graph (a real
    tensor cannot enter an operation on fake tensors)."""
    if detect_fake_mode() is None:
        return t
    with unset_fake_temporarily():
        data = t.tolist()
    return torch.tensor(data, dtype=t.dtype, device=t.device)


def triton_op_runs(backend: str) -> bool:
    """Whether a call on ``backend`` takes the op's ``triton_op`` (its kernels visible to torch.compile)
    rather than the opaque operator: the Triton backend, except in a graph traced under the
    interpreter (interpreted kernels cannot be traced; see ``launchable``)."""
    return backend == "triton" and not (compiling() and triton_interpreting())


def seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The dropout seed as the ops take it: a 1-element int64 tensor on ``device`` (x's device).

    A tensor already there is used as it is (what the modules pass: drawn on the device). An int becomes
    a tensor with ``torch.full`` (on CUDA a fill kernel: the value travels as a kernel argument, not as
    a host→device copy, which would synchronise). A tensor on another device is moved, which from the
    CPU to a GPU is such a copy: pass seeds on x's device."""
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            raise ValueError(f"seed must be an int or a 1-element integer tensor, got {seed.dtype} {tuple(seed.shape)}")
        seed = seed.reshape(1)
        if seed.dtype == torch.int64 and seed.device == device:
            return seed
        return seed.to(device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31) or a 1-element integer tensor, got {seed!r}")
    return torch.full((1,), seed, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=None)
def unused_seed(device: torch.device) -> torch.Tensor:
    """A seed tensor for p = 0 (never read): made once per device, so a call without dropout allocates
    and launches nothing for it."""
    with torch.inference_mode(False):
        return torch.zeros(1, dtype=torch.int64, device=device)


def draw_seed(device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh dropout seed in [0, 2³¹) drawn by ``device``'s generator, on that device (a CUDA seed is
    drawn by a kernel: no host→device copy, no synchronisation, capturable in a CUDA graph)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)
