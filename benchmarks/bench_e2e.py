"""End-to-end PETALface: one training step and one inference batch, fused vs the reference model.

Both providers are the same :class:`~petal_fast.models.PetalFace` with the same weights:
- ``petal_fast``  the auto backend (C++ on CPU, Triton on CUDA; SDPA attention);
- ``reference``   a deep copy with ``attention_impl="math"`` (explicit softmax attention) run
                  under ``petal_fast.use_backend("reference")`` (the literal PetalLinear /
                  margin-loss / BRISQUE formulas).
``train_step``: BRISQUE → α → forward → CosFace loss → backward → AdamW step on adapters + head.
``quality_alpha``: the BRISQUE → α part of the step alone.
``inference``: ``embed(images, flip=True)`` (image and mirror, each with its own α) in eval mode
under ``torch.inference_mode``. CPU: small presets in fp32; CUDA: the paper's Swin, batch 64, bf16
(backbone and head cast to bf16; α and the quality measure stay fp32). Ratios are to ``reference``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch

from benchmarks.common import append_rows, print_table, summary_rows, time_interleaved
from petal_fast import use_backend
from petal_fast.models import PetalFace, set_attention_impl
from petal_fast.progress import progress

SUITE = "e2e"
# (preset, batch, classes)
CPU_CASES = [("tiny", 32, 1000), ("small", 16, 1000)]
CPU_QUICK = [("tiny", 16, 200)]
CUDA_CASES = [("petalface", 64, 10_000)]
CUDA_QUICK = [("small", 64, 10_000)]


def build(preset: str, num_classes: int, batch: int, device: torch.device, dtype: torch.dtype):
    """The fused model, an identical reference copy, a batch of images in [−1, 1] and labels."""
    torch.manual_seed(0)
    model = PetalFace(preset, num_classes=num_classes, quality="brisque", loss="cosface").to(device)
    size = model.backbone.img_size
    images = (torch.rand(batch, 3, size, size, device=device) * 2 - 1)
    model.calibrate_quality(images, progress=False)
    model.backbone.to(dtype)
    model.head.to(dtype)
    reference = set_attention_impl(copy.deepcopy(model), "math")  # the released code's explicit softmax
    labels = torch.randint(0, num_classes, (batch,), device=device)
    return model, reference, images.to(dtype), labels


def train_step_fn(model: PetalFace, images: torch.Tensor, labels: torch.Tensor, backend: str | None):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scope = (lambda: use_backend(backend)) if backend else contextlib.nullcontext

    def step() -> None:
        with scope():
            loss = model(images, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def inference_fn(model: PetalFace, images: torch.Tensor, backend: str | None):
    scope = (lambda: use_backend(backend)) if backend else contextlib.nullcontext

    def infer() -> None:
        with scope(), torch.inference_mode():
            model.embed(images, flip=True)
    return infer


def _with_backend(backend: str, fn, *args):
    with use_backend(backend):
        return fn(*args)


def peak_memory(fn, device: torch.device) -> float:
    """Peak CUDA memory (MiB) above what was allocated before one call."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _keep(rows: list[dict], new: list[dict]) -> None:
    append_rows(SUITE, new)
    rows += new


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    cases = (CUDA_QUICK if quick else CUDA_CASES) if cuda else (CPU_QUICK if quick else CPU_CASES)
    dtype = torch.bfloat16 if cuda else torch.float32
    repeat = 3 if quick else (10 if cuda else 5)
    rows: list[dict] = []
    for preset, batch, classes in progress(cases, desc="e2e cases"):
        model, reference, images, labels = build(preset, classes, batch, device, dtype)
        shape = f"{preset} B={batch} C={classes} {model.backbone.img_size}px"
        report = model.parameter_report()
        notes = f"trainable {report.trainable + report.head} / {report.total + report.head}; alpha from BRISQUE"
        model.train(), reference.train()
        train = {"petal_fast": train_step_fn(model, images, labels, None),
                 "reference": train_step_fn(reference, images, labels, "reference")}
        samples = time_interleaved(train, device, warmup=1, repeat=repeat)
        phase = summary_rows(SUITE, device, "train_step", shape, str(dtype).replace("torch.", ""),
                             "fwd+loss+bwd+adamw", samples, "reference", notes)
        if cuda:
            time_row = phase[-1]
            for name, fn in train.items():
                phase.append({**time_row, "provider": name, "metric": "peak_memory",
                              "median": f"{peak_memory(fn, device):.1f}", "q20": "", "q80": "", "unit": "MiB",
                              "ratio": ""})
        _keep(rows, phase)  # appended per phase: a stage time limit keeps what was measured
        alpha = {"petal_fast": lambda: model.alpha(images),
                 "reference": lambda: _with_backend("reference", reference.alpha, images)}
        samples = time_interleaved(alpha, device, warmup=1, repeat=repeat)
        _keep(rows, summary_rows(SUITE, device, "quality_alpha", shape, str(dtype).replace("torch.", ""),
                                 "brisque->alpha", samples, "reference", "the quality part of train_step"))
        model.eval(), reference.eval()
        infer = {"petal_fast": inference_fn(model, images, None),
                 "reference": inference_fn(reference, images, "reference")}
        samples = time_interleaved(infer, device, warmup=1, repeat=repeat)
        _keep(rows, summary_rows(SUITE, device, "inference", shape, str(dtype).replace("torch.", ""),
                                 "embed(flip=True)", samples, "reference", "alpha from BRISQUE per image and mirror"))
        del model, reference
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smallest preset, few repeats (smoke run)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = ap.parse_args()
    print_table(run(args.quick, args.device), "PETALface end to end (ratio = provider / reference model)")


if __name__ == "__main__":
    main()
