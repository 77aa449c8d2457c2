"""No host↔device synchronisation in a PETALface training step on a GPU (``gpu``): forward with BRISQUE → α
and dropout p = 0.1, the fused margin loss, backward and the AdamW step, under
``torch.cuda.set_sync_debug_mode("error")`` (any synchronising call raises). The same property is proven
on a CPU with the CUDA host path stubbed (tests/test_cuda_host_path.py)."""
from __future__ import annotations

import pytest
import torch

from test_compile import images, small_petalface

pytestmark = pytest.mark.gpu


def test_training_step_has_no_host_sync():
    model = small_petalface(dropout=0.1, device="cuda").train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    x, labels = images(4, "cuda"), torch.randint(0, 10, (4,), device="cuda")
    for step in range(3):  # the first step builds caches (kernels, seeds' tensors) that may sync once
        if step == 2:
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss = model(x, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
