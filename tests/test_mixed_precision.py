"""Mixed precision on CPU: the margin loss under ``torch.autocast("cpu")`` and ``petal-fast train
amp=bf16|fp16`` give fp32's results within 16-bit tolerance (docs/design.md §4: ‖Δ‖/‖ref‖ < 1e-2 for
bf16, 3e-3 for fp16) instead of NotImplementedError (no 16-bit C++ kernel) or a dtype mismatch."""
from __future__ import annotations

import json

import pytest
import torch

import petal_fast
import petal_fast.train
from petal_fast import _ext
from petal_fast.nn.margin_loss import MarginSoftmaxLoss

from test_train import tiny_cfg

# the fused backends (the reference is plain autograd: under autocast its logits are bf16 matmuls)
BACKENDS = ["torch"] + (["cpp"] if _ext.load_error() is None else [])
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("loss", ["cosface", "arcface", "adaface"])
def test_margin_loss_under_cpu_autocast_matches_fp32(backend, dtype, loss):
    """16-bit embeddings from an autocast region against fp32 class centres: the loss and the centres'
    gradient are fp32's on the same (16-bit) embeddings; their gradient comes back 16-bit, rounded."""
    torch.manual_seed(torch.seed() % 2**31)
    print("seed", torch.initial_seed())
    x, labels = torch.randn(7, 24), torch.randint(0, 13, (7,))
    with torch.autocast("cpu", dtype=dtype):
        e16 = torch.nn.Linear(24, 16)(x).detach()
    assert e16.dtype == dtype
    head = MarginSoftmaxLoss(16, 13, loss=loss)
    results = []
    for amp, e in ((False, e16.float()), (True, e16)):
        e = e.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        with petal_fast.use_backend(backend), torch.autocast("cpu", dtype=dtype, enabled=amp):
            out = head(e, labels)
        assert out.dtype == torch.float32
        out.backward()
        assert e.grad.dtype == e.dtype
        results.append((out.detach(), head.weight.grad.clone(), e.grad))
    (ref_loss, ref_dw, ref_de), (loss16, dw16, de16) = results
    assert _rel(loss16, ref_loss) < 1e-5 and _rel(dw16, ref_dw) < 1e-5
    assert _rel(de16, ref_de) < TOL[dtype]


def test_margin_loss_backward_inside_autocast():
    """A backward called while autocast is still on computes in the op's own precision too."""
    e = torch.randn(5, 16, requires_grad=True)
    head = MarginSoftmaxLoss(16, 9)
    labels = torch.randint(0, 9, (5,))
    head(e, labels).backward()
    ref = e.grad.clone()
    e.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        head(e, labels).backward()
    assert _rel(e.grad, ref) < 1e-5


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_amp_on_cpu_matches_fp32(tmp_path, amp):
    """``amp=bf16|fp16`` trains on CPU: every step applied, losses within 16-bit tolerance of fp32's."""
    common = dict(max_steps=3, epochs=1, dropout=0.0)
    ref = petal_fast.train.Trainer(tiny_cfg(tmp_path, output=str(tmp_path / "fp32"), amp="off", **common)).fit()
    got = petal_fast.train.Trainer(tiny_cfg(tmp_path, output=str(tmp_path / amp), amp=amp, **common)).fit()
    assert got.steps == 3 and got.skipped == 0
    assert got.losses == pytest.approx(ref.losses, rel=3e-2)


def test_cli_train_amp_bf16(tmp_path):
    from petal_fast.cli import main
    out = tmp_path / "run"
    assert main(["train", "mode=petalface", "backbone=tiny", "batch_size=8", "epochs=1", "data.num_identities=4",
                 "data.images_per_identity=4", f"output={out}", "progress=false", "amp=bf16"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped"] == 0
