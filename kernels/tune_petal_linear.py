"""Re-tune the PetalLinear Triton tiles and designs on the GPU present, or compile them without one.

    python -m petal_fast.kernels.tune_petal_linear --tune [--quick] [--m 8192 --k 4096 --n 4096 --rank 8]
    python -m petal_fast.kernels.tune_petal_linear --compile-check 90

``--tune`` times the candidate tiles of each kernel with ``triton.testing.do_bench``, then each
design's kernels together per direction, and prints the entries to paste into ``TILE_CONFIGS`` and
``DEFAULT_DESIGN`` (kernels/petal_linear_config.py). ``--compile-check ARCH`` compiles the table's
kernels for sm_ARCH without a GPU and prints their shared memory (``TRITON_DUMP_PTXAS_LOG=1``
shows registers and spills) to catch resource overruns.
"""
from __future__ import annotations

import argparse

import torch
import triton

from . import petal_linear as launch  # launchers looked up when called, so a patched one is what gets timed
from . import petal_linear_kernels as jit_kernels
from .petal_linear_config import DESIGN_KERNELS, DESIGNS, DIRECTIONS, TILE_CONFIGS, padded_rank, tiles

CANDIDATES = {
    "shrink": [dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=s)
               for bm in (32, 64, 128) for bk in (64, 128) for w in (4, 8) for s in (2, 3, 4)],
    "fwd": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
            for bm, bn in ((128, 128), (128, 256), (64, 128), (128, 64)) for bk in (32, 64)
            for w in (4, 8) for s in (3, 4)],
    "bwd_dy": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, programs_per_sm=ps)
               for bm in (32, 64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3) for ps in (1, 2, 4)],
    "bwd_dx": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
               for bm, bk in ((128, 128), (128, 256), (64, 128), (128, 64)) for bn in (32, 64)
               for w in (4, 8) for s in (3, 4)],
}
CANDIDATES["fwd_onepass"] = CANDIDATES["fwd"]
CANDIDATES["bwd_onepass"] = CANDIDATES["bwd_dx"]
# A pruned search (~8 tiles a kernel, around the table's entry) that fits a short GPU lease:
# each candidate costs a compile (~1-2 s) more than its timing.
QUICK_CANDIDATES = {
    "shrink": [dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=s)
               for bm, bk, w, s in ((64, 128, 4, 3), (32, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4),
                                    (64, 128, 4, 4), (128, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 4))],
    "fwd": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
                                     (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                                     (128, 128, 64, 8, 3), (128, 256, 32, 8, 4))],
    "bwd_dy": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, programs_per_sm=ps)
               for bm, bn, w, s, ps in ((64, 128, 8, 3, 2), (64, 128, 4, 3, 2), (128, 128, 8, 3, 1),
                                        (32, 128, 4, 3, 4), (64, 64, 4, 2, 2), (128, 64, 8, 2, 2),
                                        (64, 128, 8, 2, 4), (128, 128, 8, 2, 2))],
    "bwd_dx": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in ((128, 64, 128, 8, 4), (128, 64, 128, 8, 3), (128, 32, 128, 8, 4),
                                        (128, 64, 256, 8, 3), (64, 64, 128, 4, 4), (128, 64, 64, 4, 4),
                                        (128, 32, 256, 8, 3), (128, 64, 128, 4, 3))],
}
QUICK_CANDIDATES["fwd_onepass"] = QUICK_CANDIDATES["fwd"]
QUICK_CANDIDATES["bwd_onepass"] = QUICK_CANDIDATES["bwd_dx"]


def tune(m: int = 8192, k: int = 4096, n: int = 4096, rank: int = 8, branches: int = 2,
         dtype: torch.dtype = torch.bfloat16, p: float = 0.0, device: str = "cuda",
         candidates: dict[str, list[dict[str, int]]] | None = None,
         bench=None) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """Time every candidate tile of each kernel on the current GPU; return the fastest per kernel
    and, per direction, the faster design (the sum of its kernels' best times).

    Configurations are given for 16-bit inputs (``config_for`` derives the float32 tiles from
    them); tune with a 16-bit dtype to fill the table. With p > 0 the one-pass backward is not
    used (see ``backward``), so only the split backward is tuned. ``device``, ``candidates`` and
    ``bench`` (a callable timing a function in ms; default ``triton.testing.do_bench``) exist so
    the search itself can be tested in the interpreter.
    """
    from petal_fast.progress import progress

    if bench is None:
        from triton.testing import do_bench as bench
    candidates = candidates or CANDIDATES
    dev = torch.device(device)
    x = torch.randn(m, k, device=dev, dtype=dtype)
    w = torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5
    bias = torch.randn(n, device=dev, dtype=dtype)
    a_cat = torch.randn(branches * rank, k, device=dev, dtype=dtype) / k ** 0.5
    b_cat = torch.randn(n, branches * rank, device=dev, dtype=dtype)
    coef = torch.rand(8, branches, device=dev)
    params = launch.launch_params(x, a_cat, coef, p, 0)
    u = torch.empty(m, branches * rank, device=dev, dtype=dtype)
    y, dy, dx = (torch.empty(m, n, device=dev, dtype=dtype), torch.randn(m, n, device=dev, dtype=dtype),
                 torch.empty_like(x))
    dt = torch.zeros(m, params.rp, device=dev)
    db, da = torch.zeros(n, branches * rank, device=dev), torch.zeros(branches * rank, k, device=dev)
    runs = {
        "shrink": lambda cfg: launch._launch_shrink(x, a_cat, u, params, cfg),
        "fwd": lambda cfg: launch._launch_fwd(x, w, bias, a_cat, u, b_cat, y, params, cfg, onepass=False),
        "bwd_dy": lambda cfg: launch._launch_bwd_dy(dy, b_cat, u, dt, db, params, cfg),
        "bwd_dx": lambda cfg: launch._launch_bwd_dx(dy, w, dt, a_cat, x, dx, da, params, cfg),
        "fwd_onepass": lambda cfg: launch._launch_fwd(x, w, bias, a_cat, u, b_cat, y, params, cfg, onepass=True),
        "bwd_onepass": lambda cfg: launch._launch_bwd_onepass(dy, w, b_cat, u, a_cat, x, dx, da, db, params, cfg),
    }
    if params.dropout:
        del runs["bwd_onepass"]
    best: dict[str, dict[str, int]] = {}
    best_ms: dict[str, float] = {}
    for name, run in runs.items():
        timings = []
        for cfg in progress(candidates[name], desc=f"tune {name}"):
            try:
                timings.append((bench(lambda: run(cfg)), cfg))
            except triton.runtime.errors.OutOfResources:
                continue  # too much shared memory / registers for this GPU
            except Exception as err:  # noqa: BLE001 - a tile that fails to compile is no candidate
                print(f"{name} {cfg}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        if not timings:
            print(f"{name}: no candidate ran")
            continue
        best_ms[name], best[name] = min(timings, key=lambda t: t[0])
        print(f"{name:11s} {best_ms[name] * 1e3:9.1f} us  {best[name]}")
    designs: dict[str, str] = {}
    for direction in DIRECTIONS:
        totals = {d: sum(best_ms[kn] for kn in DESIGN_KERNELS[d, direction]) for d in DESIGNS
                  if all(kn in best_ms for kn in DESIGN_KERNELS[d, direction])}
        designs[direction] = min(totals, key=totals.get)
        print(f"{direction}: " + ", ".join(f"{d} {t * 1e3:.1f} us" for d, t in totals.items())
              + f" -> {designs[direction]}")
    return best, designs


def compile_check(arch: int = 90, dtype: torch.dtype = torch.bfloat16, rank: int = 8, branches: int = 2,
                  dropout: bool = False) -> list[dict[str, object]]:
    """Compile every kernel for ``sm_<arch>`` with its table tiles (as ``config_for`` derives them
    for ``dtype``), without a GPU (no launch).

    Uses the specialisation a real launch gets (unit inner strides, 16-divisible pointers and
    sizes) and returns the shared memory per kernel; with ``TRITON_DUMP_PTXAS_LOG=1`` ptxas also
    prints registers and spills. Run with TRITON_INTERPRET unset.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    d = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    rp, precision = padded_rank(branches * rank), "ieee" if dtype == torch.float32 else "tf32"
    unit = {"s_xk", "s_wk", "s_ak", "s_br", "s_dyn"}
    div16 = {"M", "N", "K", "s_xm", "s_wn", "s_ar", "s_um", "s_bn", "s_ym", "s_dym", "s_dxm"}
    fp32_ptrs = {"coef_ptr", "dt_ptr", "db_ptr", "da_ptr"}
    fwd = dict(BRANCHES=branches, HAS_BIAS=True, DROPOUT=dropout, RP=rp, PRECISION=precision)
    to_compile = {
        "shrink": (jit_kernels.shrink_kernel, dict(RP=rp, PRECISION=precision)),
        "fwd": (jit_kernels.fwd_kernel, {**fwd, "ONEPASS": False}),
        "bwd_dy": (jit_kernels.bwd_dy_kernel, dict(BRANCHES=branches, DROPOUT=dropout, ATOMIC_DT=True,
                                                     RP=rp, PRECISION=precision)),
        "bwd_dx": (jit_kernels.bwd_dx_kernel, dict(COMPUTE_DX=True, RP=rp, PRECISION=precision)),
        "fwd_onepass": (jit_kernels.fwd_kernel, {**fwd, "ONEPASS": True}),
        "bwd_onepass": (jit_kernels.bwd_onepass_kernel,  # runs at p = 0 only
                        dict(BRANCHES=branches, RP=rp, PRECISION=precision)),
    }
    table = TILE_CONFIGS.get(arch // 10, TILE_CONFIGS["default"])
    rows = []
    for name, (fn, consts) in to_compile.items():
        cfg = tiles(table, name, dtype, dropout)
        opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        cfg.pop("programs_per_sm", None)
        consts = {**consts, **cfg, **{a: 1 for a in unit if a in fn.arg_names}}
        signature, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            if arg in consts:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                signature[arg] = "*i64" if arg == "seed_ptr" else "*" + ("fp32" if arg in fp32_ptrs else d)
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[arg] = "fp32" if arg == "keep_scale" else "i32"
                if arg in div16:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        rows.append({"kernel": name, "shared_bytes": compiled.metadata.shared, **opts, **cfg})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Re-tune the PetalLinear Triton tiles on the current GPU.")
    parser.add_argument("--tune", action="store_true", help="time candidate tiles and print a TILE_CONFIGS entry")
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--branches", type=int, default=2, choices=(1, 2))
    parser.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true", help="the pruned QUICK_CANDIDATES search (~1 min on an H100)")
    parser.add_argument("--compile-check", type=int, metavar="ARCH",
                        help="compile the table's kernels for sm_ARCH (e.g. 90) without a GPU and print shared memory")
    args = parser.parse_args()
    if args.compile_check:
        for row in compile_check(args.compile_check, getattr(torch, args.dtype), args.rank, args.branches,
                                 args.dropout > 0):
            print(row)
        return
    if not args.tune:
        parser.print_help()
        return
    if not torch.cuda.is_available():
        raise SystemExit("--tune needs a CUDA GPU")
    best, designs = tune(args.m, args.k, args.n, args.rank, args.branches, getattr(torch, args.dtype), args.dropout,
                          candidates=QUICK_CANDIDATES if args.quick else None)
    major = torch.cuda.get_device_capability()[0]
    print(f"\n# {torch.cuda.get_device_name()} — paste into TILE_CONFIGS:\n{major}: {{")
    for name, cfg in best.items():
        print(f"    {name!r}: dict({', '.join(f'{k}={v}' for k, v in cfg.items())}),")
    print(f"}},\n# and into DEFAULT_DESIGN:\n{major}: {designs!r},")


if __name__ == "__main__":
    main()
