"""PetalLinear: fused vs the frozen base ``F.linear`` (the floor) vs the released eager layer vs PEFT.

Providers (interleaved in one process, medians over repeats, inputs rotated):
- ``base``      frozen ``F.linear(x, W, b)`` — forward, and backward for dX only (W frozen);
- ``fused``     ``PetalLinear`` on the auto backend (C++ on CPU, Triton on CUDA), two branches;
- ``addmm``     the torch composition (unsloth-style ``addmm_``), two branches;
- ``reference`` the released code's eager form: α repeated per row, input scaled per branch;
- ``fused_1b`` / ``peft``  one-branch PetalLinear vs PEFT's ``lora.Linear`` (same rank 2r).
Modes: ``fwd`` and ``full`` (forward + backward), dropout p = 0 and 0.1. Ratios are to ``base``.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks.common import append_rows, print_table, summary_rows, time_interleaved
from petal_fast import PetalLinear, use_backend
from petal_fast.reference import released_petal_linear

SUITE = "linear"
# (tokens M, in, out): the qkv layers of the paper's Swin at batch 64 and at the per-GPU batch of 8.
PETALFACE_SHAPES = [(25600, 384, 1152), (6400, 768, 2304), (1600, 1536, 4608),
                    (3200, 384, 1152), (800, 768, 2304), (200, 1536, 4608)]
CPU_SQUARE = [(2048, 4096, 4096)]
CUDA_SQUARE = [(8192, 4096, 4096)]
QUICK_SHAPES = [(512, 128, 384), (64, 256, 768)]
TOKENS_PER_IMAGE = {384: 400, 768: 100, 1536: 25}  # windows×tokens per image at each Swin stage


def _peft_layer(base: torch.nn.Linear, rank: int, dropout: float):
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLoraLinear
    except ImportError:
        return None
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout)
    layer = PeftLoraLinear(base, adapter_name="default", config=config, r=rank, lora_alpha=rank,
                           lora_dropout=dropout)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer


def _providers(m: int, k: int, n: int, rank: int, p: float, mode: str, device, dtype, rotate: int = 2):
    """Callables for every provider at one shape; each call consumes the next rotated input set."""
    images = max(1, m // TOKENS_PER_IMAGE.get(k, m))
    while m % images:
        images -= 1
    layer = PetalLinear(k, n, rank=rank, dropout=p, device=device, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    layer_1b = PetalLinear.from_linear(torch.nn.Linear(k, n, device=device, dtype=dtype), rank=2 * rank, dropout=p,
                                       branches=1)
    with torch.no_grad():
        layer_1b.weight.copy_(layer.weight)
        layer_1b.lora_B.normal_(0, 0.02)
    base_lin = torch.nn.Linear(k, n, device=device, dtype=dtype)
    base_lin.weight.requires_grad_(False)
    base_lin.bias.requires_grad_(False)
    peft = _peft_layer(base_lin, 2 * rank, p)
    grad = mode == "full"
    xs = [torch.randn(m, k, device=device, dtype=dtype, requires_grad=grad) for _ in range(rotate)]
    dys = [torch.randn(m, n, device=device, dtype=dtype) for _ in range(rotate)]
    alphas = [torch.rand(images, device=device, dtype=dtype) for _ in range(rotate)]
    counter = itertools.count()
    w, b = layer.weight, layer.bias

    def run(forward):
        def call():
            i = next(counter) % rotate
            with (contextlib.nullcontext() if grad else torch.no_grad()):
                y = forward(xs[i], alphas[i])
                if grad:
                    y.backward(dys[i])
        return call

    providers = {
        "base": run(lambda x, a: F.linear(x, w, b)),
        "fused": run(lambda x, a: layer(x, alpha=a)),
        "addmm": run(lambda x, a: _with_backend("torch", layer, x, a)),
        "reference": run(lambda x, a: released_petal_linear(x, w, b, layer.lora_A, layer.lora_B, a, layer.scale, p,
                                                            training=True)),
        "fused_1b": run(lambda x, a: layer_1b(x)),
    }
    if peft is not None:
        providers["peft"] = run(lambda x, a: peft(x))
    return providers, images


def _with_backend(name, layer, x, a):
    with use_backend(name):
        return layer(x, alpha=a)


def run(quick: bool = False, device: str | None = None, rank: int = 8) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        shapes, repeat, ps = QUICK_SHAPES, 3, (0.0, 0.1)
    else:
        shapes = PETALFACE_SHAPES + (CUDA_SQUARE if device.type == "cuda" else CPU_SQUARE)
        repeat, ps = (10 if device.type == "cuda" else 7), (0.0, 0.1)
    ranks = (rank, 16) if device.type == "cuda" and not quick else (rank,)
    cases = [(s, r, p, mode) for s in shapes for r in ranks for p in ps for mode in ("fwd", "full")
             if not (r != rank and s not in CUDA_SQUARE)]
    rows = []
    for (m, k, n), r, p, mode in tqdm(cases, desc="PetalLinear", unit="case"):
        torch.manual_seed(0)
        providers, images = _providers(m, k, n, r, p, mode, device, dtype)
        samples = time_interleaved(providers, device, warmup=2, repeat=repeat)
        rows += summary_rows(SUITE, device, f"r{r}_p{p}", f"M={m} K={k} N={n} images={images}",
                             str(dtype).replace("torch.", ""), mode, samples, baseline="base",
                             notes="ratio = provider / frozen F.linear")
        del providers
    append_rows(SUITE, rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank per branch")
    args = ap.parse_args()
    print_table(run(args.quick, args.device, args.rank), "PetalLinear (ratio = provider / frozen base)")


if __name__ == "__main__":
    main()
