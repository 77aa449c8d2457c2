"""PetalLinear: fused vs the frozen base ``F.linear`` (the floor) vs the released eager layer vs PEFT.

Providers (interleaved in one process, medians over repeats, inputs rotated):
- ``base``      frozen ``F.linear(x, W, b)`` — forward, and backward for dX only (W frozen);
- ``fused``     ``PetalLinear``, two branches: the C++ backend on CPU; on CUDA the Triton split
                design (shrink kernel for U, then the fused GEMM), forced with ``use_design("split")``;
- ``fused_onepass`` (CUDA only) the same layer on the Triton one-pass design (``use_design("onepass")``);
- ``addmm``     the torch composition (unsloth-style ``addmm_``), two branches;
- ``reference`` the released code's eager form: α repeated per row, input scaled per branch;
- ``fused_1b`` / ``peft``  one-branch PetalLinear vs PEFT's ``lora.Linear`` (same rank 2r).

Modes, dropout p = 0 and 0.1:
- ``fwd``  forward under ``no_grad``;
- ``bwd``  backward only: each rotated input's graph is built once, outside the timing, and a call
           is ``torch.autograd.grad(y, (x, *trainable), dy, retain_graph=True)`` (no ``.grad``
           accumulates); trainable = the provider's LoRA A and B (none for ``base``);
- ``full`` forward and backward in one call, the backward as in ``bwd`` (``autograd.grad``: the
           gradients a training step with ``zero_grad(set_to_none=True)`` produces, no accumulation).
Time rows carry the ratio to ``base``.

Every time row is followed by a ``tflops`` row: the model flop count over the time. With M rows,
K in, N out and R the total LoRA rank (2r for every LoRA provider: two branches of rank r, or the
one branch of rank 2r of ``fused_1b``/``peft``; R = 0 for ``base``)::

    fwd   2MNK + 2MR(K + N)    x Wᵀ; U = x Aᵀ and U Bᵀ
    bwd   2MNK + 4MR(K + N)    dX = dY W (no dW: W frozen); dU = dY B, dB = dYᵀ U, dA = dUᵀ x, dX += dU A
    full  fwd + bwd

Bias, dropout, the per-row branch weights and the reference's input scaling are elementwise and
not counted, so a provider doing extra work shows as lower TFLOP/s.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from benchmarks.common import append_rows, print_table, summary_rows, time_interleaved
from petal_fast import PetalLinear, use_backend
from petal_fast.progress import progress
from petal_fast.reference import released_petal_linear

SUITE = "linear"
MODES = ("fwd", "bwd", "full")
# (tokens M, in, out): the qkv layers of the paper's Swin at batch 64 and at the per-GPU batch of 8.
PETALFACE_SHAPES = [(25600, 384, 1152), (6400, 768, 2304), (1600, 1536, 4608),
                    (3200, 384, 1152), (800, 768, 2304), (200, 1536, 4608)]
CPU_SQUARE = [(2048, 4096, 4096)]
CUDA_SQUARE = [(8192, 4096, 4096)]  # the docs/design.md §6 goal shape: measured first, so a timeout keeps it
QUICK_SHAPES = [(512, 128, 384), (64, 256, 768)]
TOKENS_PER_IMAGE = {384: 400, 768: 100, 1536: 25}  # windows×tokens per image at each Swin stage
CUDA_REP_MS = 25  # do_bench time per round on CUDA: the case list must fit gpu_suite.sh's budget


@dataclass(frozen=True)
class Provider:
    """One way to compute the layer: forward(x, α), the tensors its backward yields besides dX,
    its total LoRA rank R (for the flop count) and the context both passes run under."""
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    trainable: tuple[torch.Tensor, ...] = ()
    lora_rank: int = 0
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def flops(m: int, k: int, n: int, lora_rank: int, mode: str) -> float:
    """Model flop count of one call (module docstring); ``lora_rank`` 0 is the frozen base."""
    fwd = 2 * m * n * k + 2 * m * lora_rank * (k + n)
    bwd = 2 * m * n * k + 4 * m * lora_rank * (k + n)
    return float({"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[mode])


def cases(quick: bool, device: torch.device, rank: int = 8,
          petalface_only: bool = False) -> list[tuple[int, int, int, int, float, str]]:
    """(M, K, N, rank, p, mode) of a run: rank 16 only at the CUDA square shape; ``petalface_only``
    leaves the square shape out (a shorter re-measurement of the paper's shapes)."""
    cuda = device.type == "cuda"
    square = [] if petalface_only else (CUDA_SQUARE if cuda else CPU_SQUARE)
    shapes = QUICK_SHAPES if quick else square + PETALFACE_SHAPES
    ranks = (rank, 16) if cuda and not quick else (rank,)
    return [(m, k, n, r, p, mode) for m, k, n in shapes for r in ranks for p in (0.0, 0.1) for mode in MODES
            if not (r != rank and (m, k, n) not in CUDA_SQUARE)]


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


@contextlib.contextmanager
def _triton_design(design: str) -> Iterator[None]:
    """The Triton backend with ``design`` forced; imports the kernels, so CUDA runs only."""
    from petal_fast.kernels.petal_linear import use_design
    with use_backend("triton"), use_design(design):
        yield


def _with_backend(name: str, layer: PetalLinear, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    with use_backend(name):
        return layer(x, alpha=a)


def _fused(layer: PetalLinear, device: torch.device) -> dict[str, Provider]:
    """``fused`` on the auto backend on CPU; on CUDA one provider per Triton design."""
    forward = lambda x, a: layer(x, alpha=a)  # noqa: E731
    trainable, r = (layer.lora_A, layer.lora_B), layer.branches * layer.rank
    if device.type != "cuda":
        return {"fused": Provider(forward, trainable, r)}
    return {name: Provider(forward, trainable, r, lambda d=design: _triton_design(d))
            for name, design in (("fused", "split"), ("fused_onepass", "onepass"))}


def _providers(m: int, k: int, n: int, rank: int, p: float, device: torch.device,
               dtype: torch.dtype) -> dict[str, Provider]:
    """Every provider at one shape, sharing the frozen W and b where the form allows."""
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
    w, b, lora = layer.weight, layer.bias, (layer.lora_A, layer.lora_B)
    providers = {
        "base": Provider(lambda x, a: F.linear(x, w, b)),
        **_fused(layer, torch.device(device)),
        "addmm": Provider(lambda x, a: _with_backend("torch", layer, x, a), lora, 2 * rank),
        "reference": Provider(lambda x, a: released_petal_linear(x, w, b, *lora, a, layer.scale, p, training=True),
                              lora, 2 * rank),
        "fused_1b": Provider(lambda x, a: layer_1b(x), (layer_1b.lora_A, layer_1b.lora_B), 2 * rank),
    }
    if peft is not None:
        providers["peft"] = Provider(lambda x, a: peft(x), (peft.lora_A["default"].weight,
                                                            peft.lora_B["default"].weight), 2 * rank)
    return providers


def _timed_call(provider: Provider, mode: str, xs: list[torch.Tensor], alphas: list[torch.Tensor],
                dys: list[torch.Tensor]) -> Callable[[], None]:
    """The call timed for ``provider`` in ``mode``; each call takes its next rotated input set."""
    turn = itertools.count()  # per provider: a shared counter would pin each provider to one input set

    if mode == "fwd":
        def call() -> None:
            i = next(turn) % len(xs)
            with provider.context(), torch.no_grad():
                provider.forward(xs[i], alphas[i])
    elif mode == "full":
        def call() -> None:
            i = next(turn) % len(xs)
            with provider.context():
                torch.autograd.grad(provider.forward(xs[i], alphas[i]), (xs[i], *provider.trainable), dys[i])
    elif mode == "bwd":
        with provider.context():
            ys = [provider.forward(x, a) for x, a in zip(xs, alphas)]

        def call() -> None:
            i = next(turn) % len(xs)
            with provider.context():
                torch.autograd.grad(ys[i], (xs[i], *provider.trainable), dys[i], retain_graph=True)
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return call


def build_case(m: int, k: int, n: int, rank: int, p: float, mode: str, device: torch.device | str,
               dtype: torch.dtype, rotate: int = 2,
               images: int | None = None) -> tuple[dict[str, Callable[[], None]], dict[str, float], int]:
    """One case: the timed call and the flop count of every provider, and the number of images (given, or
    from PETALface's tokens per image at width ``k``)."""
    device = torch.device(device)
    if images is None:
        images = max(1, m // TOKENS_PER_IMAGE.get(k, m))
        while m % images:
            images -= 1
    elif images < 1 or m % images:
        raise ValueError(f"images must divide M={m}, got {images}")
    providers = _providers(m, k, n, rank, p, device, dtype)
    grad = mode != "fwd"
    xs = [torch.randn(m, k, device=device, dtype=dtype, requires_grad=grad) for _ in range(rotate)]
    alphas = [torch.rand(images, device=device, dtype=dtype) for _ in range(rotate)]
    dys = [torch.randn(m, n, device=device, dtype=dtype) for _ in range(rotate)]
    calls = {name: _timed_call(prov, mode, xs, alphas, dys) for name, prov in providers.items()}
    work = {name: flops(m, k, n, prov.lora_rank, mode) for name, prov in providers.items()}
    return calls, work, images


def run(quick: bool = False, device: str | None = None, rank: int = 8, petalface_only: bool = False) -> list[dict]:
    """Time every case; rows are appended per case, so a run cut short keeps what it measured."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    repeat = 3 if quick else (10 if cuda else 7)
    rows = []
    for m, k, n, r, p, mode in progress(cases(quick, device, rank, petalface_only), desc="PetalLinear", unit="case"):
        torch.manual_seed(0)
        calls, work, images = build_case(m, k, n, r, p, mode, device, dtype)
        samples = time_interleaved(calls, device, warmup=2, repeat=repeat, rep_ms=CUDA_REP_MS)
        case_rows = summary_rows(SUITE, device, f"r{r}_p{p}", f"M={m} K={k} N={n} images={images}",
                                 str(dtype).replace("torch.", ""), mode, samples, baseline="base",
                                 notes="ratio = provider / frozen F.linear", flops=work)
        append_rows(SUITE, case_rows)
        rows += case_rows
        del calls
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats (smoke run)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank per branch")
    ap.add_argument("--petalface-only", action="store_true", help="only the paper's shapes (no square shape)")
    args = ap.parse_args()
    print_table(run(args.quick, args.device, args.rank, args.petalface_only),
                "PetalLinear (ratio = provider / frozen base)")


if __name__ == "__main__":
    main()
