"""Convergence: N PETALface training steps with the fused ops against the same steps with the
reference ops, from one initial state.

The fused model runs in float32 on the backend under test (C++ on CPU; Triton in the interpreter),
the reference model is a float64 copy under ``use_backend("reference")`` (the literal formulas for
PetalLinear and the margin loss). Both see the same batches, the same per-image α and the same
PetalLinear dropout seeds (p = 0.1, counter-hash masks), and step AdamW. Every step's loss and the
final adapter and head weights must agree: an error in any backward term (dA, dB, dX into the
earlier layers, the margin gradient) shows as drift that grows with the steps.
"""
from __future__ import annotations

import copy

import pytest
import torch

import petal_fast
from petal_fast import _ext
from petal_fast.models import PetalFace, set_attention_impl

from conftest import rel_err, triton_interpreter_ok

STEPS = 20
BATCH, CLASSES = 6, 11


def _model() -> PetalFace:
    model = PetalFace("tiny", num_classes=CLASSES, quality=None, dropout=0.1, loss="arcface")
    # Only PetalLinear's dropout is reproducible across dtypes (counter hash); the backbone's other
    # dropouts draw from torch's generator, whose masks need not match between float32 and float64.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attn_drop"):
            m.attn_drop = 0.0
    return model.train()


def _train(model: PetalFace, dtype: torch.dtype, data, backend: str) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=0.05)
    losses = []
    for step, (images, labels, alpha) in enumerate(data):
        torch.manual_seed(1000 + step)  # the dropout seeds PetalLinear draws this step
        with petal_fast.use_backend(backend):
            loss = model(images.to(dtype), labels, alpha=alpha.to(dtype))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


BACKENDS = ["cpp", pytest.param("triton", marks=pytest.mark.skipif(not triton_interpreter_ok(),
                                                                    reason="needs Triton's interpreter"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_matches_reference(backend):
    if backend == "cpp" and not _ext.has_op("petal_linear"):
        pytest.skip("the C++ backend is not built")
    # the interpreter runs every kernel program in Python: fewer, smaller steps
    steps, batch = (STEPS, BATCH) if backend == "cpp" else (3, 4)
    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)
    model = _model()
    with torch.no_grad():  # adapters away from B = 0, so every path carries signal from step 0
        for m in model.modules():
            if isinstance(m, petal_fast.PetalLinear):
                m.lora_B.normal_(0, 0.05, generator=gen)
    # the reference models: literal attention formula, reference ops (use_backend in _train)
    reference = set_attention_impl(copy.deepcopy(model).double(), "math")
    reference32 = set_attention_impl(copy.deepcopy(model), "math")
    size = model.backbone.img_size
    # two batches, alternated: the run can fit them, so a learning run shows a falling loss
    batches = [(torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, CLASSES, (batch,), generator=gen),
                torch.rand(batch, generator=gen)) for _ in range(2)]
    data = [batches[step % 2] for step in range(steps)]

    fused_losses = _train(model, torch.float32, data, backend)
    ref_losses = _train(reference, torch.float64, data, "reference")
    # float32 rounding alone moves the trajectory: the literal formulas in float32 measure how much
    # (with few images the feature head's BatchNorm amplifies it); the fused run may drift within an
    # order of magnitude of that, while a wrong gradient term gives O(1) errors within a few steps
    ref32_losses = _train(reference32, torch.float32, data, "reference")

    where = f"(data seed {seed})"
    assert all(torch.isfinite(torch.tensor(fused_losses))), where
    assert sum(ref_losses[-2:]) < sum(ref_losses[:2]), f"the reference run must learn {where}"
    for step, (a, b, c) in enumerate(zip(fused_losses, ref_losses, ref32_losses)):
        bound = max(1e-4 * max(1.0, abs(b)), 10 * abs(c - b))
        assert abs(a - b) <= bound, f"step {step}: loss {a} vs reference {b} (float32 reference {c}) {where}"
    ref_params, ref32_params = dict(reference.named_parameters()), dict(reference32.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            bound = max(1e-4, 10 * rel_err(ref32_params[name], ref_params[name]))
            assert rel_err(p, ref_params[name]) < bound, f"{name} after {steps} steps {where}"
