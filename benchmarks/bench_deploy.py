"""Deployment paths of PETALface: eager vs ``torch.compile`` vs ONNX Runtime, in one process.

Inference (``mode = embedding``): raw embeddings of a batch with α given per image (the quality
measure runs before, outside every provider), eval mode, ``torch.inference_mode``:
- ``eager``        ``model.embedding(images, alpha)`` with the fused ops (C++ on CPU, Triton on CUDA);
- ``compiled``     the same under ``torch.compile(fullgraph=True)`` (Inductor);
- ``onnxruntime``  ``petal-fast export --alpha input`` → ONNX Runtime (CPU provider, as many threads
                   as torch), the adapters as plain matmuls, α a graph input;
- ``onnxruntime_merged``  ``--alpha 0.5``: both branches folded into W, the plain backbone.
Rows: time per batch (ratio to ``eager``) and throughput (images/s); one-off costs as
``compile_time`` / ``export_time`` rows (seconds, first call included).
Training (``mode = train_step``, CPU: the tiny preset): α from BRISQUE → forward → CosFace loss →
backward → AdamW, eager vs the forward + loss compiled with ``fullgraph=True`` (AOTAutograd
compiles the backward; the optimizer step stays eager).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from petal_fast.progress import progress

from benchmarks.common import append_rows, base_row, print_table, summary_rows, time_interleaved
from petal_fast.export import Embedder, export
from petal_fast.models import PetalFace

SUITE = "deploy"
# (preset, batch): the demo size and the `small` model
CPU_CASES = [("tiny", 32), ("small", 8)]
CPU_QUICK = [("tiny", 8)]
TRAIN_CASES = [("tiny", 32, 1000)]
TRAIN_QUICK = [("tiny", 8, 100)]


def build(preset: str, batch: int, num_classes: int | None = None, quality="brisque"):
    torch.manual_seed(0)
    model = PetalFace(preset, num_classes=num_classes, quality=quality)
    with torch.no_grad():  # trained-looking adapters (B ≠ 0), so no branch is a no-op
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    size = model.backbone.img_size
    return model, torch.rand(batch, 3, size, size) * 2 - 1, torch.rand(batch), size


def _extra(rows: list[dict], template: dict, provider: str, metric: str, value: float, unit: str, notes: str) -> None:
    rows.append({**template, "provider": provider, "metric": metric, "median": f"{value:.4g}", "q20": "",
                 "q80": "", "unit": unit, "baseline": "", "ratio": "", "notes": notes})


def inference_rows(preset: str, batch: int, repeat: int) -> list[dict]:
    import onnxruntime as ort
    model, images, alpha, size = build(preset, batch, quality=None)
    model.eval()
    embedder = Embedder(model, alpha_input=True)
    compiled = torch.compile(embedder, fullgraph=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        compiled(images, alpha)
    compile_s = time.perf_counter() - t0
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # no spin-waiting after a run: ORT's idle workers would otherwise hold the cores while the next
    # provider of the interleaved timing runs, slowing whichever comes after an ORT call
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions, export_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, how in (("onnxruntime", "input"), ("onnxruntime_merged", 0.5)):
            t0 = time.perf_counter()
            path = export(copy.deepcopy(model), size, "onnx", how, Path(tmp) / f"{name}.onnx")
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            export_s[name] = time.perf_counter() - t0
    feeds = {"images": images.numpy(), "alpha": alpha.numpy()}

    def eager():
        with torch.inference_mode():
            model.embedding(images, alpha)

    def comp():
        with torch.inference_mode():
            compiled(images, alpha)

    providers = {"eager": eager, "compiled": comp,
                 "onnxruntime": lambda: sessions["onnxruntime"].run(None, feeds),
                 "onnxruntime_merged": lambda: sessions["onnxruntime_merged"].run(None, {"images": feeds["images"]})}
    samples = time_interleaved(providers, "cpu", warmup=2, repeat=repeat)
    shape = f"{preset} B={batch} {size}px"
    rows = summary_rows(SUITE, "cpu", "inference", shape, "float32", "embedding", samples, "eager",
                        "alpha given per image; onnxruntime_merged: alpha 0.5 folded into W")
    template = {**base_row(SUITE, "cpu"), "case": "inference", "shape": shape, "dtype": "float32", "mode": "embedding"}
    for provider, s in samples.items():
        med = sorted(s)[len(s) // 2]
        _extra(rows, template, provider, "throughput", batch / med * 1e3, "img/s", "batch / median time")
    _extra(rows, template, "compiled", "compile_time", compile_s, "s", "torch.compile, first call (Inductor)")
    for name, s in export_s.items():
        _extra(rows, template, name, "export_time", s, "s", "petal_fast.export to ONNX + session creation")
    return rows


def train_rows(preset: str, batch: int, classes: int, repeat: int) -> list[dict]:
    model, images, _, size = build(preset, batch, classes)
    model.calibrate_quality(images, progress=False)
    model.train()
    labels = torch.randint(0, classes, (batch,))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, fullgraph=True)

    def step_fn(module, params):
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step() -> None:
            loss = module(images, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    eager = step_fn(model, [p for p in model.parameters() if p.requires_grad])
    comp = step_fn(compiled, [p for p in twin.parameters() if p.requires_grad])
    t0 = time.perf_counter()
    comp()
    compile_s = time.perf_counter() - t0
    samples = time_interleaved({"eager": eager, "compiled": comp}, "cpu", warmup=1, repeat=repeat)
    shape = f"{preset} B={batch} C={classes} {size}px"
    rows = summary_rows(SUITE, "cpu", "train_step", shape, "float32", "fwd+loss+bwd+adamw", samples, "eager",
                        "alpha from BRISQUE; compiled: forward + loss with fullgraph=True, eager AdamW")
    template = {**base_row(SUITE, "cpu"), "case": "train_step", "shape": shape, "dtype": "float32",
                "mode": "fwd+loss+bwd+adamw"}
    for provider, s in samples.items():
        med = sorted(s)[len(s) // 2]
        _extra(rows, template, provider, "throughput", batch / med * 1e3, "img/s", "batch / median time")
    _extra(rows, template, "compiled", "compile_time", compile_s, "s", "torch.compile, first step (Inductor)")
    return rows


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    if device not in (None, "cpu"):
        raise ValueError("the deploy suite measures the CPU paths (ONNX Runtime's CPU provider); run it with --device cpu")
    repeat = 3 if quick else 10
    rows: list[dict] = []
    for preset, batch in progress(CPU_QUICK if quick else CPU_CASES, desc="deploy inference"):
        rows += inference_rows(preset, batch, repeat)
    for preset, batch, classes in TRAIN_QUICK if quick else TRAIN_CASES:
        rows += train_rows(preset, batch, classes, repeat)
    append_rows(SUITE, rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smallest case, few repeats (smoke run)")
    args = ap.parse_args()
    print_table(run(args.quick, "cpu"), "PETALface deployment paths (ratio = provider / eager)")


if __name__ == "__main__":
    main()
