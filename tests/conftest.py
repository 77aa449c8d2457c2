"""Shared test helpers: float64 references, relative errors, poisoned outputs, device params."""
from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run in the interpreter on CPU tensors. The flag must be set
# before any kernel module is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (docs/design.md §4)."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run, but reproducible from the printed seed on failure."""
    seed = int.from_bytes(os.urandom(4), "little") % (2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for k, v in item.user_properties:
            if k == "seed":
                call.excinfo.value.args = (*call.excinfo.value.args, f"[torch seed {v}]") if call.excinfo.value.args else (f"[torch seed {v}]",)


def triton_interpreter_ok() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1"
