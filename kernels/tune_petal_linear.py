"""Re-tune the PetalLinear Triton tiles and designs on the GPU present, or compile them without one.

    python -m petal_fast.kernels.tune_petal_linear --tune [--quick] [--m 8192 --k 4096 --n 4096 --rank 8]
    python -m petal_fast.kernels.tune_petal_linear --compile-check 90 [--dropout 0.1] [--dtype bfloat16]

``--tune`` times each kernel's candidate tiles at one shape through the real launchers (the whole
forward or backward call with that one tile for that kernel, ``triton.testing.do_bench``), then
both designs per direction with the best tiles, and prints the rungs to add to ``TILE_CONFIGS``
and the ``DEFAULT_DESIGN`` entry (kernels/petal_linear_config.py): one shape is one rung of the ladders.

``--compile-check ARCH`` compiles every rung of the table of sm_ARCH (90 → sm_90a) without a GPU,
with the specialisation a launch at a PETALface shape gets, and reports per kernel: registers and
spilled bytes (``ptxas -v`` on the kernel's PTX, the ptxas Triton uses), shared memory, whether the
PTX holds TMA loads / stores (``cp.async.bulk.tensor``), and whether ptxas serialised the wgmma
pipeline (C7514 / C7515 warnings). Run with TRITON_INTERPRET unset.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
import sys
from pathlib import Path

import torch
import triton

from . import petal_linear as launch
from . import petal_linear_kernels as pk
from . import petal_linear_tma as tk
from .petal_linear_config import (DESIGN_KERNELS, DESIGNS, DIRECTIONS, KERNELS, TILE_CONFIGS, TMA_KERNELS, generation,
                                  padded_rank, tiles, use_design)

_TMA = dict(TMA=1, EPI_SPLIT=1, FLATTEN=0, programs_per_sm=1)
CANDIDATES = {
    "shrink": [dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=s, programs_per_sm=2)
               for bm in (16, 32, 64, 128) for bk in (64, 128, 256) for w in (4, 8) for s in (2, 3, 4)],
    "fwd": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s, **dict(_TMA, **extra))
            for bm, bn in ((128, 256), (128, 128), (64, 128), (64, 64)) for bk in (32, 64)
            for w in (4, 8) for s in (3, 4) for extra in ({}, {"EPI_SPLIT": 2}, {"FLATTEN": 1})],
    "bwd_dy": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, programs_per_sm=ps)
               for bm in (32, 64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3) for ps in (1, 2, 4)],
    "bwd_dx": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s, **_TMA)
               for bm, bk in ((128, 128), (128, 256), (64, 128), (64, 64)) for bn in (32, 64)
               for w in (4, 8) for s in (3, 4)],
    "bwd_onepass": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
                    for bm, bk in ((128, 128), (128, 256), (64, 128)) for bn in (32, 64) for w in (4, 8)
                    for s in (3, 4)],
}
CANDIDATES["fwd_onepass"] = CANDIDATES["fwd"]
# A pruned search (~8 tiles a kernel, around the table's rungs) that fits a short GPU lease:
# each candidate costs a compile (~1-5 s) more than its timing.
QUICK_CANDIDATES = {
    "shrink": [dict(BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=s, programs_per_sm=2)
               for bm, bk, w, s in ((64, 128, 4, 4), (32, 128, 4, 4), (16, 256, 4, 3), (128, 128, 8, 3),
                                    (64, 64, 4, 4), (32, 256, 4, 3), (64, 128, 8, 2), (16, 128, 4, 4))],
    "fwd": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=w, num_stages=s, **dict(_TMA, **extra))
            for bm, bn, w, s, extra in ((128, 256, 8, 3, {}), (128, 128, 8, 4, {}), (128, 128, 8, 4, {"EPI_SPLIT": 2}),
                                        (64, 128, 4, 4, {}), (64, 64, 4, 4, {}), (128, 256, 8, 3, {"FLATTEN": 1}),
                                        (128, 128, 8, 3, {}), (64, 128, 4, 3, {"EPI_SPLIT": 2}))],
    "bwd_dy": [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s, programs_per_sm=ps)
               for bm, bn, w, s, ps in ((64, 128, 8, 3, 2), (64, 128, 4, 3, 2), (128, 128, 8, 3, 1),
                                        (32, 128, 4, 3, 4), (64, 64, 4, 2, 2), (128, 64, 8, 2, 2),
                                        (32, 128, 4, 3, 2), (128, 128, 8, 2, 2))],
    "bwd_dx": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s, **_TMA)
               for bm, bn, bk, w, s in ((128, 64, 128, 8, 4), (128, 64, 128, 8, 3), (128, 32, 128, 8, 4),
                                        (128, 64, 256, 8, 3), (64, 64, 128, 4, 4), (64, 64, 64, 4, 4),
                                        (128, 32, 256, 8, 3), (128, 64, 128, 4, 3))],
    "bwd_onepass": [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
                    for bm, bn, bk, w, s in ((128, 64, 256, 8, 3), (128, 64, 128, 8, 3), (128, 32, 128, 8, 4),
                                             (64, 64, 128, 4, 3))],
}
QUICK_CANDIDATES["fwd_onepass"] = QUICK_CANDIDATES["fwd"]
DIRECTION = {"shrink": "fwd", "fwd": "fwd", "fwd_onepass": "fwd", "bwd_dy": "bwd", "bwd_dx": "bwd",
             "bwd_onepass": "bwd"}


def _with_rung(table: dict, kernel: str, cfg: dict) -> dict:
    """``table`` with ``kernel``'s ladder (its dropout ladder too) replaced by the one rung ``cfg``."""
    out = {k: v for k, v in table.items() if k not in (kernel, f"{kernel}_dropout")}
    out[kernel] = {"candidate": cfg}
    return out


def tune(m: int = 8192, k: int = 4096, n: int = 4096, rank: int = 8, branches: int = 2,
         dtype: torch.dtype = torch.bfloat16, p: float = 0.0, device: str = "cuda",
         candidates: dict[str, list[dict[str, int]]] | None = None,
         bench=None) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """Time every candidate tile of each kernel on the current GPU at one shape; return the fastest
    per kernel and, per direction, the faster design (its call with the best tiles).

    A candidate is timed as the forward or backward call it is part of, with that tile as the
    kernel's only rung (the other kernels keep the device's ladders). Configurations are for 16-bit
    inputs (``tiles`` derives float32 ones). With p > 0 the one-pass backward is not used, so it is
    not tuned. ``device``, ``candidates`` and ``bench`` (a callable timing a function in ms;
    default ``triton.testing.do_bench``) exist so the search itself can be tested in the interpreter.
    """
    if bench is None:
        from triton.testing import do_bench as bench
    candidates = candidates or CANDIDATES
    dev = torch.device(device)
    table = TILE_CONFIGS[generation(dev)]
    x = torch.randn(m, k, device=dev, dtype=dtype)
    w = torch.randn(n, k, device=dev, dtype=dtype) / k ** 0.5
    bias = torch.randn(n, device=dev, dtype=dtype)
    lora_a = torch.randn(branches, rank, k, device=dev, dtype=dtype) / k ** 0.5
    lora_b = torch.randn(branches, n, rank, device=dev, dtype=dtype)
    alpha = torch.rand(8, device=dev) if branches == 2 else None
    seed = torch.tensor([1234], device=dev)
    dy = torch.randn(m, n, device=dev, dtype=dtype)
    _, u = launch.forward(x, w, bias, lora_a, lora_b, alpha, 0.5, p, seed, 7)

    def call(kernel: str, tbl: dict):
        if DIRECTION[kernel] == "fwd":
            return lambda: launch.forward(x, w, bias, lora_a, lora_b, alpha, 0.5, p, seed, 7, table=tbl)
        return lambda: launch.backward(dy, x, w, lora_a, lora_b, alpha, u, 0.5, p, seed, 7, True, table=tbl)

    best: dict[str, dict[str, int]] = {}
    for name in KERNELS:
        if name == "bwd_onepass" and p > 0:
            continue
        design = "onepass" if name.endswith("onepass") else "split"
        timings = []
        for i, cfg in enumerate(candidates[name], start=1):
            print(f"tune {name}: {i}/{len(candidates[name])}", end="\r" if sys.stderr.isatty() else "\n",
                  file=sys.stderr, flush=True)
            try:
                with use_design(design):
                    timings.append((bench(call(name, _with_rung(table, name, cfg))), cfg))
            except triton.runtime.errors.OutOfResources:
                continue  # too much shared memory / registers for this GPU
            except Exception as err:  # noqa: BLE001 - a tile that fails to compile is no candidate
                print(f"{name} {cfg}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        if not timings:
            print(f"{name}: no candidate ran")
            continue
        ms, best[name] = min(timings, key=lambda t: t[0])
        print(f"{name:11s} {ms * 1e3:9.1f} us per {DIRECTION[name]} call  {best[name]}")
    tuned = dict(table)
    for name, cfg in best.items():
        tuned = _with_rung(tuned, name, cfg)
    designs: dict[str, str] = {}
    for direction in DIRECTIONS:
        totals = {}
        for design in DESIGNS:
            kernels = DESIGN_KERNELS[design, direction]
            if all(kn in best for kn in kernels):
                with use_design(design):
                    totals[design] = bench(call(kernels[-1], tuned))
        designs[direction] = min(totals, key=totals.get)
        print(f"{direction}: " + ", ".join(f"{d} {t * 1e3:.1f} us" for d, t in totals.items())
              + f" -> {designs[direction]}")
    return best, designs


# -- ahead-of-time compile check -------------------------------------------------------------------------
# A launch's specialisation at a PETALface shape (M = 1600 rows, K = 768 in, N = 2304 out, rank 8 per
# branch): Triton marks ints divisible by 16 and turns ints equal to 1 (unit strides) into constants.
_SHAPE = dict(M=1600, K=768, N=2304, rows_per_image=200)
_FP32_PTRS = {"alpha_ptr", "dt_ptr", "db_ptr", "da_ptr", "ws_ptr"}
_TMA_LOAD = re.compile(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global")
_TMA_STORE = re.compile(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared")


def _arg_values(rank: int, branches: int, rp: int) -> dict[str, object]:
    M, K, N = _SHAPE["M"], _SHAPE["K"], _SHAPE["N"]
    return dict(M=M, N=N, K=K, R=branches * rank, rank=rank, rows_per_image=_SHAPE["rows_per_image"], scale=0.5,
                stream_mix=12345, threshold=1677722, keep_scale=1.1, tiles_per_split=3,
                dt_off=branches * rank * (K + N), db_off=branches * rank * K,
                s_wn=K, s_wk=1, s_a0=rank * K, s_a1=K, s_ak=1, s_b0=N * rank, s_bn=rank, s_br=1,
                n_a=branches * rank * K, n_all=branches * rank * (K + N))


def _source(fn, consts: dict, values: dict, dtype: str, seed: bool):
    """The ASTSource of ``fn`` as a launch specialises it (see ``_arg_values``)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    signature, constants, attrs = {}, dict(consts), {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):  # the seed at p = 0: x stands in (never read)
            signature[arg] = "*i64" if arg == "seed_ptr" and seed else "*" + ("fp32" if arg in _FP32_PTRS else dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            param = fn.params[i]
            kind, attr = native_specialize_impl(CUDABackend, values[arg], False, not param.do_not_specialize, True)
            signature[arg] = kind
            if kind == "constexpr":
                constants[arg] = values[arg]
            elif attr == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()}, attrs)


def _ptxas_report(ptx: str, arch: int) -> dict[str, object]:
    """Registers, spilled bytes and wgmma serialisation from ``ptxas -v`` on ``ptx`` (Triton's ptxas and flags)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", "-lineinfo",
                              f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"],
                             capture_output=True, text=True, check=True).stderr
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", log).group(1)),
            "wgmma_serialized": "C7514" in log or "C7515" in log}


def _compile_jobs(arch: int, dtype: torch.dtype, rank: int, branches: int, dropout: bool):
    """(kernel, rung, JIT function, constexprs, options) for every rung of sm_``arch``'s table."""
    table = TILE_CONFIGS.get(arch // 10, TILE_CONFIGS["default"])
    rp, precision = padded_rank(branches * rank), "ieee" if dtype == torch.float32 else "tf32"
    common = dict(BRANCHES=branches, RP=rp, PRECISION=precision)
    for kernel in KERNELS:
        if kernel == "bwd_onepass" and dropout:
            continue  # runs at p = 0 only
        rungs = table.get(f"{kernel}_dropout", table[kernel]) if dropout else table[kernel]
        for rung_name, rung in rungs.items():
            tma = bool(rung.get("TMA")) and kernel in TMA_KERNELS and dtype.itemsize == 2 and arch >= 90
            cfg = tiles(rung, kernel, dtype, tma)
            opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
            for key in ("programs_per_sm", "TMA") + (() if tma else ("EPI_SPLIT", "FLATTEN")):
                cfg.pop(key, None)
            if kernel == "bwd_dx":
                cfg.pop("EPI_SPLIT", None)
            if kernel == "shrink":
                fn, consts = pk.shrink_kernel, dict(RP=rp, PRECISION=precision)
            elif kernel in ("fwd", "fwd_onepass"):
                fn = tk.fwd_tma_kernel if tma else pk.fwd_kernel
                consts = dict(common, HAS_BIAS=True, DROPOUT=dropout, ONEPASS=kernel == "fwd_onepass")
            elif kernel == "bwd_dy":
                fn, consts = pk.bwd_dy_kernel, dict(common, DROPOUT=dropout, ATOMIC_DT=True)
            elif kernel == "bwd_dx":
                fn = tk.bwd_dx_tma_kernel if tma else pk.bwd_dx_kernel
                consts = dict(RP=rp, PRECISION=precision, **({} if tma else {"COMPUTE_DX": True}))
            else:
                fn, consts = pk.bwd_onepass_kernel, dict(common)
            yield kernel, rung_name, fn, {**consts, **cfg}, opts
    yield "finalize", "-", pk.finalize_kernel, dict(BLOCK=launch.FINALIZE_BLOCK), {"num_warps": 4, "num_stages": 1}


def compile_check(arch: int = 90, dtype: torch.dtype = torch.bfloat16, rank: int = 8, branches: int = 2,
                  dropout: bool = False) -> list[dict[str, object]]:
    """Compile every rung of sm_``arch``'s tile table for ``dtype`` without a GPU (no launch) and report
    each compiled kernel (see the module docstring); identical compilations are done once."""
    from triton.backends.compiler import GPUTarget

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    values = _arg_values(rank, branches, padded_rank(branches * rank))
    rows, done = [], {}
    for kernel, rung, fn, consts, opts in _compile_jobs(arch, dtype, rank, branches, dropout):
        key = (fn.fn.__name__, tuple(sorted(consts.items())), tuple(sorted(opts.items())))
        if key not in done:
            src = _source(fn, consts, values, names[dtype], seed=dropout)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
            ptx = compiled.asm["ptx"]
            done[key] = {"function": fn.fn.__name__, "shared_bytes": compiled.metadata.shared,
                         **_ptxas_report(ptx, arch), "tma_loads": len(_TMA_LOAD.findall(ptx)),
                         "tma_stores": len(_TMA_STORE.findall(ptx))}
        rows.append({"kernel": kernel, "rung": rung, **done[key], **opts,
                     **{k: v for k, v in consts.items() if k.isupper() and k.startswith(("BLOCK", "EPI", "FLAT"))}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="Re-tune the PetalLinear Triton tiles on the current GPU.")
    parser.add_argument("--tune", action="store_true", help="time candidate tiles and print TILE_CONFIGS rungs")
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--branches", type=int, default=2, choices=(1, 2))
    parser.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true", help="the pruned QUICK_CANDIDATES search (~1 min on an H100)")
    parser.add_argument("--compile-check", type=int, metavar="ARCH",
                        help="compile the table's kernels for sm_ARCH (e.g. 90) without a GPU and report "
                             "registers, spills, shared memory and TMA use")
    args = parser.parse_args()
    if args.compile_check:
        rows = compile_check(args.compile_check, getattr(torch, args.dtype), args.rank, args.branches,
                             args.dropout > 0)
        print(f"{'kernel':12s} {'rung':8s} {'function':19s} {'regs':>4s} {'spill':>5s} {'smem KB':>7s} "
              f"{'TMA ld/st':>9s}  serial  warps stages  tile")
        for r in rows:
            tile = " ".join(f"{k}={v}" for k, v in r.items() if k.startswith(("BLOCK", "EPI", "FLAT")))
            print(f"{r['kernel']:12s} {r['rung']:8s} {r['function']:19s} {r['registers']:4d} {r['spill_bytes']:5d} "
                  f"{r['shared_bytes'] / 1024:7.1f} {r['tma_loads']:4d}/{r['tma_stores']:<4d}  "
                  f"{'yes' if r['wgmma_serialized'] else 'no':6s}  {r['num_warps']:5d} {r['num_stages']:6d}  {tile}")
        return
    if not args.tune:
        parser.print_help()
        return
    if not torch.cuda.is_available():
        raise SystemExit("--tune needs a CUDA GPU")
    best, designs = tune(args.m, args.k, args.n, args.rank, args.branches, getattr(torch, args.dtype), args.dropout,
                         candidates=QUICK_CANDIDATES if args.quick else None)
    major = torch.cuda.get_device_capability()[0]
    print(f"\n# {torch.cuda.get_device_name()}, M={args.m} K={args.k} N={args.n} — the rung to add to each ladder "
          f"of TILE_CONFIGS[{major}]" + (" (the _dropout ladders)" if args.dropout else "") + ":")
    for name, cfg in best.items():
        print(f"    {name!r}: dict({', '.join(f'{k}={v}' for k, v in cfg.items())}),")
    print(f"# and into DEFAULT_DESIGN:\n{major}: {designs!r},")


if __name__ == "__main__":
    main()
