"""``petal-fast info`` / ``python -m petal_fast.info``: what runs where, and why not the rest.

Versions (petal_fast, Python, torch, CUDA, Triton, the C++ compiler), threads (how many, why, how
idle ones wait: :mod:`petal_fast.threads`), the settings in
force (:mod:`petal_fast.settings`, each with its variable, marked where not the default), where the
compiled CPU ops come from (``petal_fast._C`` or the just-in-time build in the user cache, and the
torch they were built for), and per op the backend that runs on CPU and on CUDA with the first line
of the reason each faster one does not. Loading the ops builds them if needed (once, ~1 min), as
the first op call would. ``--require-fast`` exits 1 when the compiled CPU ops are unavailable.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings
from typing import Sequence

import torch

import petal_fast
from petal_fast import _build, _ext, backend, settings, threads
from petal_fast.ops.brisque import backends as brisque_backends
from petal_fast.ops.margin_loss import backends as margin_loss_backends
from petal_fast.ops.petal_linear import backends as petal_linear_backends

# op → (the name backend.resolve is asked about, the backends it implements, the Triton kernel module)
# op → (its name for backend.resolve, the backends it supports, its backend table)
OPS = {
    "petal_linear": ("petal_linear", backend.BACKENDS, petal_linear_backends.BACKENDS),
    "margin_loss": ("margin_loss", backend.BACKENDS, margin_loss_backends.BACKENDS),
    "brisque": ("brisque_score", ("reference", "torch", "cpp", "triton"), brisque_backends.BACKENDS),
}
SOURCES = {"aot": "ahead-of-time extension petal_fast._C (built at install)",
           "jit": "just-in-time build (user cache)", "preloaded": "already registered in this process"}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _triton() -> tuple[str | None, str | None]:
    """(version, error): Triton's version if it imports, else the first line of why not."""
    try:
        import triton
    except Exception as err:  # noqa: BLE001 - any import failure is the answer
        return None, _first_line(err)
    return getattr(triton, "__version__", "unknown"), None


def _cuda_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _cuda_line() -> str:
    if torch.version.cuda is None:
        return f"not available (torch {torch.__version__} is a CPU build)"
    if not torch.cuda.is_available():
        return f"CUDA {torch.version.cuda} build, no GPU visible"
    dev = _cuda_device()
    major, minor = torch.cuda.get_device_capability(dev)
    return f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(dev)} (sm_{major}{minor})"


def _resolve(device: torch.device, name: str, supported: tuple[str, ...]) -> tuple[str | None, str | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return backend.resolve(device, name, supported), None
        except (ValueError, RuntimeError) as err:
            return None, _first_line(err)


def _cpu_row(op: str) -> tuple[str, str]:
    """(the backend CPU tensors get, why not the compiled op when it is not that)."""
    name, supported, _ = OPS[op]
    chosen, error = _resolve(torch.device("cpu"), name, supported)
    if chosen is None:
        return "none", error or "unknown"
    if chosen != "cpp" and "cpp" in supported:
        if _ext.status().source is None:
            return chosen, "CPU cpp: compiled CPU ops unavailable (above)"
        return chosen, "CPU cpp: op missing from the compiled library (rebuild: PETAL_FAST_BUILD=always)"
    return chosen, ""


def _cuda_row(op: str, triton_error: str | None) -> tuple[str, str]:
    """(the backend CUDA tensors get, why not the Triton kernels when it is not that)."""
    name, supported, table = OPS[op]
    if _cuda_device() is None:
        return "-", ""
    chosen, error = _resolve(_cuda_device(), name, supported)
    if chosen is None:
        return "none", error or "unknown"
    if chosen == "triton":
        try:
            table["triton"]()  # imports the op's Triton launchers
        except Exception as err:  # noqa: BLE001 - a diagnostics command reports, it does not crash
            return "triton", f"CUDA triton fails: {op}'s kernels: {_first_line(err)}"
        return "triton", ""
    return chosen, f"CUDA triton: {triton_error}" if triton_error else ""


def _tile_table(triton_error: str | None) -> list[str]:
    device = _cuda_device()
    if device is None:
        return ["Triton tiles: no CUDA device (tables are chosen per GPU generation at run time)"]
    if triton_error is not None:
        return [f"Triton tiles: Triton unavailable ({triton_error})"]
    try:
        from petal_fast.kernels import petal_linear as k
        generation = k.generation(device)
        design = settings.current().triton_design
        lines = [f"Triton tiles for this GPU (generation {generation!r}; design fwd "
                 f"{k.design_for(device, 'fwd', design)}, bwd {k.design_for(device, 'bwd', design)}):"]
        for kernel, cfg in k.TILE_CONFIGS[generation].items():
            lines.append(f"  {kernel:12s} " + ", ".join(f"{key}={value}" for key, value in cfg.items()))
        return lines
    except Exception as err:  # noqa: BLE001 - a diagnostics command reports, it does not crash
        return [f"Triton tiles: {_first_line(err)}"]


def _thread_lines() -> list[str]:
    """The intra-op pool (which the C++ ops and MKL share), why that size, how idle threads wait."""
    quota = threads.quota_cores()
    return [f"threads      {torch.get_num_threads()} intra-op (OpenMP: torch, the C++ ops and MKL), "
            f"{torch.get_num_interop_threads()} inter-op; {threads.choose(settings.current().threads).why}",
            f"             {os.cpu_count()} CPUs, {threads.affinity_cores()} in this process's affinity mask"
            + (f", a CPU quota of {quota:g}" if quota is not None else "")
            + f"; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; DataLoader workers: 1 each",
            f"             idle wait: {threads.wait_policy()}"]


def _settings_lines() -> list[str]:
    """One line per setting: field, value, its environment variable, and "default" where it is one."""
    now, default = settings.current(), settings.Settings()
    lines = ["settings     (read from the environment at import; petal_fast.settings.configure changes them)"]
    for field, var in settings.ENV.items():
        value = getattr(now, field)
        shown = "unset" if value is None else str(value)
        mark = "default" if value == getattr(default, field) else "set"
        lines.append(f"  {field:18s} {shown:12s} {mark:8s}{var}".rstrip())
    return lines


def report() -> tuple[str, bool]:
    """(the report text, whether the compiled CPU ops are loaded)."""
    st = _ext.status()  # loads, building if needed: the same thing the first CPU op call does
    triton_version, triton_error = _triton()
    cxx = _build.compiler()
    lines = [
        f"petal_fast   {petal_fast.__version__}  ({os.path.dirname(petal_fast.__file__)})",
        f"python       {platform.python_version()}  ({sys.executable})",
        f"torch        {torch.__version__}",
        f"CUDA         {_cuda_line()}",
        f"triton       {triton_version or 'unavailable: ' + str(triton_error)}",
        f"compiler     {f'{cxx[1]}  ({cxx[0]})' if cxx else 'none on PATH (CXX, else c++)'}",
        *_thread_lines(),
        "",
        *_settings_lines(),
        "",
        f"compiled CPU ops (build={st.mode})",
    ]
    if st.source is not None:
        lines.append(f"  loaded     {SOURCES[st.source]}{', compiled now' if st.built_now else ''}")
        if st.path:
            lines.append(f"  library    {st.path}")
        lines.append(f"  built for  torch {st.built_for or 'unknown'}"
                     + (f" with {st.compiler}" if st.compiler else ""))
    else:
        lines.append(f"  UNAVAILABLE: {st.error}")
        lines.append("  the CPU ops run on the torch fallback (correct, slower)")
    lines += [f"  note       {note}" for note in st.notes]
    lines.append(f"  cache      {st.cache or _build.cache_root(settings.current().cache_dir)}")
    lines += ["", f"{'op':14s}{'CPU':8s}{'CUDA':8s}why not the fast backend"]
    for op in OPS:
        cpu, cpu_why = _cpu_row(op)
        cuda, cuda_why = _cuda_row(op, triton_error)
        why = [w for w in (cpu_why, cuda_why) if w]
        lines.append(f"{op:14s}{cpu:8s}{cuda:8s}{why[0] if why else '-'}".rstrip())
        lines += [" " * 30 + w for w in why[1:]]
    lines += ["(cpp: the compiled CPU ops above; triton: the Triton kernels, on CPU tensors only under "
              "TRITON_INTERPRET=1,",
              " the tests' interpreter; torch: the fallback composition; reference: the float64 test oracle. "
              "The backend setting forces one.)"]
    if _cuda_device() is None:
        lines.append(f"CUDA column: {_cuda_line()}")
    lines += ["", *_tile_table(triton_error)]
    return "\n".join(lines), st.source is not None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="petal-fast info", description="Versions, and which backend each "
                                 "petal_fast op runs on CPU and CUDA here (builds the C++ ops if needed).")
    ap.add_argument("--require-fast", action="store_true",
                    help="exit with status 1 when the compiled CPU ops are unavailable (for CI and scripts)")
    args = ap.parse_args(argv)
    text, fast = report()
    print(text)
    if args.require_fast and not fast:
        print(f"\npetal-fast info --require-fast: the compiled CPU ops are unavailable: {_ext.load_error()}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
