"""Host time of PetalLinear's CUDA path: µs per forward and backward call, on this CPU (issue 21, item 4).

    python -m benchmarks --suite host [--quick]        python -m benchmarks.bench_host [--quick] [--profile]

What a GPU's host spends per layer call before and between its kernels — our Python, torch's dispatch
and autograd, Triton's ``JITFunction.run`` — measured without a GPU by ``benchmarks/cuda_stub.py``'s
timing mode: the real path on CPU tensors standing in for CUDA ones, petal_fast's Triton backend
forced, the launches stubbed (its docstring lists what differs from a GPU host and in which
direction). The Hopper design is forced (``DEFAULT_DESIGN[9]``): the launch sequence of an H100/H200.

Shapes: PETALface's adapted layers, the ``attn.qkv`` of its Swin (preset ``"petalface"``: 120 px,
patch 6, dims 384 / 768 / 1536, windows of 5×5; ``proj`` and the MLP are not adapted) at per-GPU
batch 64 and 8: M = images × tokens (400 / 100 / 25 per image), K = dim, N = 3·dim, rank 8 per branch.
Stand-ins are float32 (on a GPU bf16: the host path is the same but for the tile table).

Settings: ``train_p0.1`` — the layer in training mode with the paper's dropout, α through one
``alpha_scope`` held over the calls as the model holds it over its layers (the scope's first layer
pays α's check and branch weights once per step; the timed calls are the others), inputs requiring
grad; ``fwd`` is one forward call (building the graph), ``bwd`` one
``torch.autograd.grad(y, (x, A, B), dy)`` on a retained graph. ``infer`` — eval mode, ``no_grad``.

Providers, interleaved, medians after warm-up:
- ``fused``   the PetalLinear module;
- ``minimal`` a ``torch.autograd.Function`` with two allocations and one (stubbed) Triton launch each
              way, on the same stand-ins: what the host path costs at the least;
- ``base``    ``F.linear`` with bias (and its dX-only backward) on 1 × 1 CPU stand-ins: its host path is the
              same at every shape, and a CPU stand-in of the real shape would run the GEMM itself
              (meta tensors would not, but their addmm is a Python decomposition, ~0.5 ms). A GPU
              adds cuBLAS's launch, ~5 µs. Ratios are to ``base``.

Goals on the project's 2-core CPU: forward ≤ 100 µs, backward ≤ 300 µs at every PETALface shape in
the training setting. The run ends with ``host: fwd <x> us, bwd <y> us`` for the worst shape.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from benchmarks.common import append_rows, print_table, summary_rows, time_interleaved
from benchmarks.cuda_stub import recorded_launches, standin_cuda
from petal_fast import PetalLinear, alpha_scope
from petal_fast.models.presets import SWIN_PRESETS

SUITE = "host"
RANK = 8
DROPOUT = 0.1
BATCHES = (64, 8)
SETTINGS = ("train_p0.1", "infer")


def petalface_shapes() -> list[tuple[int, int, int, int]]:
    """(M, K, N, images) of every adapted layer of PETALface's Swin at the per-GPU batches."""
    cfg = SWIN_PRESETS["petalface"]
    side = cfg["img_size"] // cfg["patch_size"]
    shapes = []
    for batch in BATCHES:
        for stage in range(len(cfg["depths"])):
            tokens, dim = (side >> stage) ** 2, cfg["embed_dim"] << stage
            shapes.append((batch * tokens, dim, 3 * dim, batch))
    return shapes


@triton.jit
def _minimal_kernel(x_ptr, w_ptr, y_ptr, u_ptr, M, N, K, stride_xm, stride_ym, BLOCK: tl.constexpr):
    """One store per program: only its launch matters here."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs * stride_ym, tl.load(x_ptr + offs * stride_xm, mask=offs < M), mask=offs < M)


class _Minimal(torch.autograd.Function):
    """y = launch(x, A, B): two allocations and one launch forward, the same backward."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b):
        m, k = x.shape
        n, r = lora_b.shape
        y, u = torch.empty((m, n), dtype=x.dtype), torch.empty((m, r), dtype=x.dtype)
        _minimal_kernel[(triton.cdiv(m, 1024),)](x, lora_a, y, u, m, n, k, x.stride(0), y.stride(0), BLOCK=1024)
        ctx.save_for_backward(x, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u = ctx.saved_tensors
        m, k = x.shape
        n, r = dy.shape[1], u.shape[1]
        dx, dab = torch.empty_like(x), torch.empty(r * (k + n), dtype=x.dtype)
        _minimal_kernel[(triton.cdiv(m, 1024),)](dy, u, dx, dab, m, n, k, dy.stride(0), dx.stride(0), BLOCK=1024)
        return dx, dab[: r * k].view(r, k), dab[r * k:].view(n, r)


@contextlib.contextmanager
def hopper_design() -> Iterator[None]:
    """The H100/H200 launch plan on CPU stand-ins (a CPU device would pick the interpreter's design).
    Training at p > 0 always takes the split backward, so forcing the forward's design is the whole plan."""
    from petal_fast.kernels.petal_linear_config import DEFAULT_DESIGN, use_design
    with use_design(DEFAULT_DESIGN[9]["fwd"]):
        yield


def build(m: int, k: int, n: int, images: int, setting: str) -> tuple[dict[str, Callable], dict[str, Callable], dict]:
    """(forward calls, backward calls, state to keep alive) of every provider at one shape."""
    train = setting.startswith("train")
    layer = PetalLinear(k, n, rank=RANK, dropout=DROPOUT).train(train)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    x = torch.randn(m, k, requires_grad=train)
    dy = torch.randn(m, n)
    a_flat, b_flat = (torch.randn(2 * RANK, k, requires_grad=train), torch.randn(n, 2 * RANK, requires_grad=train))
    tiny = {"x": torch.randn(1, 1, requires_grad=train), "w": torch.randn(1, 1), "b": torch.randn(1),
            "dy": torch.randn(1, 1)}
    alpha = torch.rand(images)
    grad = torch.enable_grad if train else torch.no_grad
    fwd = {
        "base": lambda: F.linear(tiny["x"], tiny["w"], tiny["b"]),
        "fused": lambda: layer(x),
        "minimal": lambda: _Minimal.apply(x, a_flat, b_flat),
    }
    fwd = {name: (lambda f=f: _under(grad, f)) for name, f in fwd.items()}
    state = {"layer": layer, "alpha": alpha, "tensors": (x, dy, a_flat, b_flat, tiny)}
    if not train:
        return fwd, {}, state
    with alpha_scope(alpha):
        ys = {name: f() for name, f in fwd.items()}
    inputs = {"base": (tiny["x"],), "fused": (x, layer.lora_A, layer.lora_B), "minimal": (x, a_flat, b_flat)}
    grads = {"base": tiny["dy"], "fused": dy, "minimal": dy}
    bwd = {name: (lambda name=name: torch.autograd.grad(ys[name], inputs[name], grads[name], retain_graph=True))
           for name in fwd}
    state["ys"] = ys
    return fwd, bwd, state


def _under(context, fn):
    with context():
        return fn()


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    """Time every shape and setting on this CPU (``device`` is ignored: this suite measures the host).
    The full run sweeps all cases three times and pools the samples, so a burst of load on this shared
    machine hits one pass of a case, not all of its samples."""
    warmup, repeat, passes = (5, 40, 1) if quick else (20, 100, 3)
    samples: dict[tuple, dict[str, list[float]]] = {}
    launches: dict[tuple, str] = {}
    with standin_cuda(), hopper_design():
        for _ in range(passes):
            for m, k, n, images in petalface_shapes():
                for setting in SETTINGS:
                    torch.manual_seed(0)
                    fwd, bwd, state = build(m, k, n, images, setting)
                    shape = f"M={m} K={k} N={n} images={images}"
                    with alpha_scope(state["alpha"]):
                        for mode, calls in (("fwd", fwd), ("bwd", bwd)):
                            if calls:
                                got = time_interleaved(calls, "cpu", warmup=warmup, repeat=repeat)
                                pooled = samples.setdefault((setting, shape, mode), {name: [] for name in got})
                                for name, times in got.items():
                                    pooled[name] += times
                                launches[(setting, shape, mode)] = ", ".join(
                                    f"{name} {count}" for name, count in launches_per_call(calls).items())
                    del fwd, bwd, state
    load = "load average %.2f %.2f %.2f" % os.getloadavg()
    notes = (f"CUDA host path on CPU stand-ins, one intra-op thread (benchmarks/cuda_stub.py: stub H100, "
             f"launches stubbed); {load}")
    rows = []
    for (setting, shape, mode), times in samples.items():
        rows += summary_rows(SUITE, "cpu", setting, shape, "float32", mode, times, baseline="base",
                             notes=f"{notes}; Triton launches per call: {launches[(setting, shape, mode)]}")
    append_rows(SUITE, rows)
    return rows


def launches_per_call(calls: dict[str, Callable]) -> dict[str, int]:
    """How many (stubbed) Triton launches one call of each provider makes."""
    counts = {}
    for name, call in calls.items():
        with recorded_launches() as launches:
            call()
        counts[name] = len(launches)
    return counts


def worst_training_shape(rows: list[dict]) -> tuple[str, float, float]:
    """(shape, fwd µs, bwd µs) of the fused layer's slowest forward + backward in the training setting."""
    medians: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["provider"] == "fused" and r["case"] == "train_p0.1" and r["metric"] == "time":
            medians.setdefault(r["shape"], {})[r["mode"]] = float(r["median"]) * 1e3
    shape = max(medians, key=lambda s: medians[s].get("fwd", 0.0) + medians[s].get("bwd", 0.0))
    return shape, medians[shape]["fwd"], medians[shape]["bwd"]


def summary_line(rows: list[dict]) -> str:
    """The run's last line: ``host: fwd <x> us, bwd <y> us`` for the worst PETALface shape (training)."""
    _, fwd, bwd = worst_training_shape(rows)
    return f"host: fwd {fwd:.0f} us, bwd {bwd:.0f} us"


def profile(m: int = 25600, k: int = 384, n: int = 1152, images: int = 64, calls: int = 300, top: int = 30) -> None:
    """Where one training forward and one backward call of the fused layer spend their µs: cProfile over
    ``calls`` calls, each figure per call and scaled by (unprofiled time / profiled time) — cProfile's
    own cost per Python call inflates the raw totals ~3–4×; the scaled figures keep the proportions."""
    with standin_cuda(), hopper_design():
        torch.manual_seed(0)
        fwd, bwd, state = build(m, k, n, images, "train_p0.1")
        with alpha_scope(state["alpha"]):
            for name, call in (("forward", fwd["fused"]), ("backward", bwd["fused"])):
                plain = min(time_interleaved({name: call}, "cpu", warmup=20, repeat=calls)[name]) * 1e3
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(calls):
                    call()
                prof.disable()
                stats = pstats.Stats(prof).stats
                total = max(ct for (_cc, _nc, _tt, ct, _callers) in stats.values())
                scale = plain * calls / (total * 1e6)
                print(f"\n== {name}, M={m} K={k} N={n}: {plain:.0f} µs per call unprofiled (fastest); figures "
                      f"in µs per call, scaled ×{scale:.2f} to it ==")
                for title, column in (("with callees (cumulative)", 3), ("in the function itself", 2)):
                    print(f"-- {title}\n{'µs':>7} {'calls':>6}  function")
                    for (file, line, func), entry in sorted(stats.items(), key=lambda kv: kv[1][column],
                                                            reverse=True)[:top if column == 3 else top // 2]:
                        where = f"{os.path.relpath(file) if file.startswith('/') else file}:{line}({func})"
                        print(f"{entry[column] / calls * 1e6 * scale:7.1f} {entry[1] / calls:6.1f}  {where}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (same shapes)")
    ap.add_argument("--profile", action="store_true", help="print where one forward and one backward call spend µs")
    args = ap.parse_args()
    if args.profile:
        profile()
        return
    rows = run(args.quick)
    print_table(rows, "CUDA host path per call (ms; ratio = provider / F.linear)")
    print(summary_line(rows))


if __name__ == "__main__":
    main()
