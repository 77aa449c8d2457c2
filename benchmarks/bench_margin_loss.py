"""Margin-softmax loss: fused (never holds B×C) vs the materialised insightface-style reference.

Providers (interleaved in one process, medians over repeats):
- ``materialised`` normalise, linear to B×C cosines, margin on the target column, cross entropy
                   (``petal_fast.reference.margin_loss``) — the baseline;
- ``fused``        ``margin_loss`` on the auto backend (C++ on CPU, Triton on CUDA);
- ``fused_torch``  the torch composition of the same chunked online-LSE algorithm (CPU, C ≤ 10k).
Mode ``fwd+bwd`` (ArcFace, exact gradients, dE and dW). Memory: on CPU the peak RSS of a fresh
subprocess running one fwd+bwd minus that of a subprocess holding the same inputs and gradients
("extra"); on CUDA ``max_memory_allocated`` minus the inputs and gradients. Both processes first make one tiny
call of the same backend, so the runtime's one-off initialisation is not counted as "extra". Ratios are to
``materialised``. Shapes skip the materialised path where it would not fit in memory.
"""
from __future__ import annotations

import argparse
import contextlib
import textwrap

import torch

from benchmarks.common import append_rows, base_row, peak_rss_subprocess, print_table, summary_rows, time_interleaved
from petal_fast import use_backend
from petal_fast.ops.margin_loss import margin_loss
from petal_fast.progress import progress

SUITE = "margin_loss"
LOSS = "arcface"
D = 512
FULL_CPU = [(256, 10_000), (1024, 10_000), (256, 100_000), (1024, 100_000), (256, 200_000), (256, 1_000_000),
            (1024, 1_000_000)]
FULL_CUDA = FULL_CPU + [(256, 2_000_000), (1024, 2_000_000)]
QUICK = [(32, 1_000), (64, 5_000)]
MATERIALISED_LIMIT = 10 * 2**30  # bytes: ~6 B×C fp32 tensors live at the materialised peak
BACKENDS = {"materialised": "reference", "fused": "auto", "fused_torch": "torch"}


def _step(backend: str, e, w, labels) -> None:
    ctx = contextlib.nullcontext() if backend == "auto" else use_backend(backend)
    with ctx:
        loss = margin_loss(e, w, labels, loss=LOSS)
    loss.backward()
    e.grad = w.grad = None


def _providers(B: int, C: int, device, dtype, names):
    e = torch.randn(B, D, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(C, D, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, C, (B,), device=device)
    return {name: (lambda b=BACKENDS[name]: _step(b, e, w, labels)) for name in names}


def _rss_code(B: int, C: int, backend: str, threads: int, measure: bool) -> str:
    """A fresh process: the runtime initialised by one tiny call of ``backend`` (thread pools,
    BLAS buffers), the inputs, then one fwd+bwd (``measure``) or gradient-sized buffers (the
    baseline)."""
    run = f"_step({backend!r}, e, w, labels)\n" if measure else "de, dw = torch.ones_like(e), torch.ones_like(w)\n"
    return textwrap.dedent(f"""
        import torch
        from benchmarks.bench_margin_loss import _step
        torch.set_num_threads({threads})
        torch.manual_seed(0)
        _step({backend!r}, torch.randn(2, {D}, requires_grad=True), torch.randn(64, {D}, requires_grad=True),
              torch.tensor([0, 63]))
        e = torch.randn({B}, {D}, requires_grad=True)
        w = torch.randn({C}, {D}, requires_grad=True)
        labels = torch.randint(0, {C}, ({B},))
    """) + run


def _peak_extra_bytes(B: int, C: int, backend: str, device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        fns = _providers(B, C, device, torch.bfloat16, [n for n, b in BACKENDS.items() if b == backend])
        # the inputs are in memory_allocated already; add the bf16 gradients the step must produce
        base = torch.cuda.memory_allocated() + 2 * (B + C) * D
        torch.cuda.reset_peak_memory_stats()
        next(iter(fns.values()))()
        return torch.cuda.max_memory_allocated() - base
    threads = torch.get_num_threads()
    return (peak_rss_subprocess(_rss_code(B, C, backend, threads, True))
            - peak_rss_subprocess(_rss_code(B, C, backend, threads, False)))


def _memory_rows(B: int, C: int, device, dtype_name: str, names) -> list[dict]:
    extra = {n: _peak_extra_bytes(B, C, BACKENDS[n], device) for n in names}
    base = extra.get("materialised")
    return [{**base_row(SUITE, device), "case": LOSS, "shape": f"B={B} C={C} D={D}", "dtype": dtype_name,
             "provider": n, "mode": "fwd+bwd", "metric": "peak_extra_mem", "median": f"{v / 2**20:.1f}",
             "unit": "MiB", "baseline": "materialised",
             "ratio": f"{v / base:.4f}" if base else "",
             "notes": "peak memory beyond inputs, gradients and the initialised runtime"} for n, v in extra.items()]


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = QUICK if quick else (FULL_CUDA if device.type == "cuda" else FULL_CPU)
    repeat = 3 if quick or device.type == "cpu" else 10
    rows = []
    for B, C in progress(shapes, desc="margin loss", unit="shape"):
        names = ["fused"]
        if B * C * 4 * 6 <= MATERIALISED_LIMIT:
            names.insert(0, "materialised")
        if device.type == "cpu" and C <= 10_000:
            names.append("fused_torch")
        huge = device.type == "cpu" and B * C >= 250_000_000  # minutes per call on 2 cores: one sample
        torch.manual_seed(0)
        samples = time_interleaved(_providers(B, C, device, dtype, names), device, warmup=0 if huge else 1,
                                   repeat=1 if huge else repeat)
        dtype_name = str(dtype).replace("torch.", "")
        baseline = "materialised" if "materialised" in names else "fused"
        shape_rows = summary_rows(SUITE, device, LOSS, f"B={B} C={C} D={D}", dtype_name, "fwd+bwd", samples,
                                  baseline, notes="ratio = provider / materialised reference")
        shape_rows += _memory_rows(B, C, device, dtype_name, [n for n in names if n != "fused_torch"])
        append_rows(SUITE, shape_rows)  # per shape: a long full run keeps what it measured
        rows += shape_rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    print_table(run(quick=args.quick, device=args.device), title="margin-softmax loss, fwd+bwd")


if __name__ == "__main__":
    main()
