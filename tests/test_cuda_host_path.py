"""Issue 21's goals for the CUDA host path, checked on CPU with benchmarks/cuda_stub.py's counting mode.

The real CUDA host path (our Python, torch's dispatch, Triton's binder) runs on fake CUDA tensors with
Triton's launcher stubbed (docs/design.md §4; the harness's docstring says what is real). Goals:

- no host↔device synchronisation and no CPU tensor anywhere in the CUDA path: a two-branch
  PetalLinear training (p = 0.1 and p = 0; α through ``alpha_scope`` and passed explicitly), forward and
  backward, and inference; a whole PETALface training step (forward, fused margin loss, backward,
  AdamW step);
- forward: no CUDA kernel besides the Triton launches; backward: at most one beyond them.

Triton's JIT kernels are needed (the pytest process runs them interpreted, TRITON_INTERPRET=1), so one
subprocess runs every scenario (this file as a script, ``compile=False``: the binder and the cache key
are real, ptxas is skipped to keep the test cheap) and the tests read its report. A failure names the
op and the Python stack that issued it.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
tl = triton.language

REPO = Path(__file__).resolve().parent.parent
LINEAR = [f"train-p{p}-{alpha}" for p in ("0.1", "0") for alpha in ("scope", "explicit")]
INFERENCE = ["infer-scope", "infer-explicit"]


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "0", "TORCH_LOGS": "-dynamo"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _events(report: dict, kinds=("syncs", "cpu_tensors")) -> list[dict]:
    return [e for kind in kinds for e in report[kind]]


def _listing(events: list[dict]) -> str:
    """Each distinct op and place once, with its count, then the first one's stack."""
    counts = collections.Counter(f"{e['op']} @ {e['where']} ({e['what']})" for e in events)
    lines = [f"  {n}× {text}" for text, n in counts.items()]
    return "\n".join(lines + ["first one:", events[0]["text"]]) if events else ""


# -- the harness itself (passes today: the instrument sees what it must) -----------------------------
def test_harness_sees_syncs_cpu_tensors_kernels_and_launches(report):
    h = report["harness"]
    assert [e["op"] for e in h["syncs"]] == ["aten._local_scalar_dense.default", "aten._to_copy.default",
                                             "aten._to_copy.default", "aten.nonzero.default",
                                             "torch.cuda.synchronize"], h["syncs"]
    assert "host→device" in h["syncs"][1]["what"] and "device→host" in h["syncs"][2]["what"]
    assert [e["op"] for e in h["cpu_tensors"]] == ["aten.lift_fresh.default", "aten.mul.Tensor"], h["cpu_tensors"]
    assert "mixed into CUDA work" in h["cpu_tensors"][1]["what"]
    assert [e["op"] for e in h["kernels"]] == ["aten.addmm.default", "aten.mul.Tensor", "aten.mul.Tensor"]
    assert all(e["where"].startswith("tests/test_cuda_host_path.py:") for e in _events(h, ("syncs", "kernels")))
    (launch,) = h["launches"]
    assert launch["kernel"] == "_copy_kernel" and launch["grid"] == [13, 1, 1] and launch["constexprs"]["BLOCK"] == "1024"
    assert h["strict"].startswith("sync in the CUDA path — aten._local_scalar_dense.default")


# -- issue 21, item 2: no sync, no CPU tensor ---------------------------------------------------------
@pytest.mark.parametrize("scenario", LINEAR + INFERENCE)
def test_petal_linear_has_no_sync_and_no_cpu_tensor(report, scenario):
    r = report[scenario]
    events = _events(r["fwd"]) + (_events(r["bwd"]) if "bwd" in r else [])
    assert r["strict"] is None and not events, (
        f"{scenario}: the CUDA path synchronises or holds CPU tensors.\nstrict mode stopped at: {r['strict']}\n"
        f"all of them:\n{_listing(events)}")


def test_petalface_training_step_has_no_sync_and_no_cpu_tensor(report):
    r = report["petalface-step"]
    events = _events(r["step"])
    assert r["strict"] is None and not events, (
        f"PETALface training step (forward, margin loss, backward, AdamW): {len(r['step']['syncs'])} host syncs, "
        f"{len(r['step']['cpu_tensors'])} CPU-tensor ops.\nstrict mode stopped at: {r['strict']}\n"
        f"all of them:\n{_listing(events)}")


# -- issue 21, item 3: launches at the minimum --------------------------------------------------------
@pytest.mark.parametrize("scenario", LINEAR + INFERENCE)
def test_petal_linear_forward_launches_only_triton_kernels(report, scenario):
    fwd = report[scenario]["fwd"]
    assert fwd["launches"], f"{scenario}: no Triton launch recorded (the forward did not take the Triton path)"
    assert not fwd["kernels"], (f"{scenario} forward: {len(fwd['kernels'])} CUDA kernels besides the "
                                f"{len(fwd['launches'])} Triton launches:\n" + _listing(fwd["kernels"]))


@pytest.mark.parametrize("scenario", LINEAR)
def test_petal_linear_backward_launches_at_most_one_kernel_beyond_triton(report, scenario):
    bwd = report[scenario]["bwd"]
    assert bwd["launches"], f"{scenario}: no Triton launch recorded in backward"
    assert len(bwd["kernels"]) <= 1, (f"{scenario} backward: {len(bwd['kernels'])} CUDA kernels besides the "
                                      f"{len(bwd['launches'])} Triton launches (goal ≤ 1):\n"
                                      + _listing(bwd["kernels"]))


# -- the subprocess -----------------------------------------------------------------------------------
@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    """A launch for the harness's self-check (compiled in the subprocess, where kernels are JIT functions)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def _harness_scenario(cuda) -> dict:
    """Known ops, to check the instrument: a value read, two copies, a data-dependent op, a CPU tensor
    mixed into CUDA work, F.linear and two elementwise kernels, views, one Triton launch through the
    real binder, ``torch.cuda.synchronize()``."""
    import torch

    from benchmarks.cuda_stub import HostPathViolation
    x = torch.randn(200, 64, device="cuda")
    w, b = torch.randn(96, 64, device="cuda"), torch.randn(96, device="cuda")
    y = torch.empty_like(x)
    host = torch.ones(3)
    with cuda.record(strict=False) as r:
        x.view(-1)[0].item()
        host.to("cuda")
        x[:3, 0].cpu()
        torch.nonzero(x)
        x * torch.tensor(2.0)
        torch.nn.functional.linear(x, w, b)
        x * 2.0
        x.view(20, 640).t()  # views: no kernel
        x * x
        _copy_kernel[(13,)](x, y, x.numel(), BLOCK=1024)
        torch.cuda.synchronize()
    out = r.as_dict()
    try:
        with cuda.record(strict=True):
            x.sum().item()
        out["strict"] = None
    except HostPathViolation as err:
        out["strict"] = str(err)
    return out


def _strict(cuda, fn) -> str | None:
    from benchmarks.cuda_stub import HostPathViolation
    try:
        with cuda.record(strict=True):
            fn()
    except HostPathViolation as err:
        return str(err)
    return None


def _linear_scenario(cuda, scenario: str) -> dict:
    """A two-branch PetalLinear at a PETALface qkv shape (8 images × 50 rows, 384 → 1152, rank 8, bf16).

    With ``alpha_scope`` the layer is called twice in one scope, as a model's layers are: the first call
    may do the step's shared work once (α's check and branch weights, a step seed); the second is the
    layer call the launch budget is about ("fwd", "bwd"; the first is reported as "fwd_first"). The
    strict run covers both calls and the backward."""
    import torch

    from petal_fast import PetalLinear, alpha_scope
    train = scenario.startswith("train")
    p = float(scenario.split("-")[1][1:]) if train else 0.1
    layer = PetalLinear(384, 1152, rank=8, dropout=p, device="cuda", dtype=torch.bfloat16).train(train)
    x = torch.randn(400, 384, device="cuda", dtype=torch.bfloat16, requires_grad=train)
    alpha = torch.rand(8, device="cuda")
    dy = torch.randn(400, 1152, device="cuda", dtype=torch.bfloat16)
    scoped = scenario.endswith("scope")
    out: dict = {}

    def step(record=contextlib.nullcontext):
        with torch.set_grad_enabled(train), (alpha_scope(alpha) if scoped else contextlib.nullcontext()):
            if scoped:
                with record("fwd_first"):
                    layer(x)
            with record("fwd"):
                y = layer(x) if scoped else layer(x, alpha=alpha)
        if train:
            with record("bwd"):
                torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)

    @contextlib.contextmanager
    def record(name):
        with cuda.record(strict=False) as report:
            yield
        out[name] = report.as_dict()

    step()  # first use: binders, caches
    out["strict"] = _strict(cuda, step)
    step(record)
    return out


def _petalface_scenario(cuda) -> dict:
    """The smallest PETALface (tests/test_compile.py's settings) training as the trainer does on CUDA:
    bf16 autocast, the fused margin loss, backward, AdamW (fused, as the trainer builds it on CUDA)."""
    import torch

    from petal_fast.models import PetalFace, face_swin
    torch.manual_seed(0)
    with torch.device("cuda"):
        backbone = face_swin(img_size=20, patch_size=2, embed_dim=32, depths=[2, 1], num_heads=[2, 4],
                             window_size=5, embedding_size=64, drop_path_rate=0.1, feature_dropout=0.25)
        model = PetalFace(backbone, num_classes=10, quality="brisque", dropout=0.1).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    images = torch.rand(4, 3, 20, 20, device="cuda") * 2 - 1
    labels = torch.randint(0, 10, (4,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # first use: BRISQUE's model and tables, binders
    out = {"strict": _strict(cuda, step)}
    optimizer.zero_grad(set_to_none=True)
    with cuda.record(strict=False) as r:
        step()
    out["step"] = r.as_dict()
    return out


def main() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.cuda_stub import fake_cuda
    results = {}
    with fake_cuda(compile=False) as cuda:
        results["harness"] = _harness_scenario(cuda)
        for scenario in LINEAR + INFERENCE:
            results[scenario] = _linear_scenario(cuda, scenario)
        results["petalface-step"] = _petalface_scenario(cuda)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
