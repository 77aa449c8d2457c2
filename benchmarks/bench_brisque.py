"""Batched BRISQUE: ``petal_fast.quality.brisque`` on a batch vs the ``brisque`` package image by image.

Providers (interleaved in one process, medians over repeats), per batch of B images of H×W:
- ``package``   ``brisque.BRISQUE().score`` on each image in a Python loop (CPU; what users run
                today). Its ``score`` fails with NumPy ≥ 2.4 at one ``float()`` of a one-element
                array; ``_Package`` replaces only that conversion, every other step is the package's;
- ``fused``     ``brisque(images)`` on the auto backend (C++ on CPU, Triton on CUDA);
- ``torch``     the torch-composition fallback (float64 conv2d), on CPU.
Ratios are provider / package on CPU. On CUDA there is no package baseline: rows give the batch
time, and ``bench_e2e`` puts it in a PETALface training step (``quality_alpha``).
Inputs: textured float images in [0, 1] (smooth field + edges + noise), RGB, float32.
"""
from __future__ import annotations

import argparse
import contextlib

import numpy as np
import torch

from benchmarks.common import append_rows, print_table, summary_rows, time_interleaved
from petal_fast import use_backend
from petal_fast.progress import progress
from petal_fast.quality import brisque

SUITE = "brisque"
FULL = [(64, 120, 120), (64, 112, 112), (16, 256, 256)]
QUICK = [(8, 64, 64)]
FULL_CUDA = [(64, 112, 112), (256, 112, 112), (1024, 112, 112)]


def _package():
    """The package's BRISQUE with its NumPy ≥ 2.4 failure patched, or None if it is not installed."""
    try:
        from brisque.brisque import BRISQUE
    except ImportError:
        return None

    class _Package(BRISQUE):
        def scale_features(self, features):
            f = np.array([np.asarray(v, dtype=np.float64).reshape(-1)[0] for v in features])
            lo = np.asarray(self.scale_params["min_"], dtype=np.float64)
            hi = np.asarray(self.scale_params["max_"], dtype=np.float64)
            return -1 + 2.0 / (hi - lo) * (f - lo)

    return _Package()


def _images(b: int, h: int, w: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    yy = torch.linspace(0, 1, h)[:, None]
    xx = torch.linspace(0, 1, w)[None, :]
    field = 0.4 + 0.25 * torch.sin(8 * xx + 5 * yy * torch.rand(b, 3, 1, 1, generator=g))
    edges = 0.2 * (xx > torch.rand(b, 3, 1, 1, generator=g)).float()
    noise = 0.04 * torch.randn(b, 3, h, w, generator=g)
    return (field + edges + noise).clamp(0, 1).to(device)


def _fused(images: torch.Tensor, backend: str):
    def fn():
        with contextlib.nullcontext() if backend == "auto" else use_backend(backend):
            out = brisque(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        return out
    return fn


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = QUICK if quick else (FULL_CUDA if device.type == "cuda" else FULL)
    package = _package() if device.type == "cpu" else None
    repeat = 3 if quick else 5
    rows = []
    for b, h, w in progress(shapes, desc="brisque", unit="shape"):
        images = _images(b, h, w, device)
        providers = {}
        if package is not None:
            arrays = [im.permute(1, 2, 0).double().numpy() for im in images]
            providers["package"] = lambda arrays=arrays: [package.score(a) for a in arrays]
        providers["fused"] = _fused(images, "auto")
        if device.type == "cpu":
            providers["torch"] = _fused(images, "torch")
        samples = time_interleaved(providers, device, warmup=1, repeat=repeat)
        baseline = "package" if "package" in providers else "fused"
        note = (f"ratio = provider / brisque package loop; {torch.get_num_threads()} threads"
                if baseline == "package" else "no package baseline on CUDA; see bench_e2e quality_alpha")
        shape_rows = summary_rows(SUITE, device, "brisque", f"B={b} H={h} W={w} C=3", "float32", "score",
                                  samples, baseline, notes=note)
        append_rows(SUITE, shape_rows)
        rows += shape_rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small batch, few repeats")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    args = parser.parse_args()
    print_table(run(quick=args.quick, device=args.device), title="batched BRISQUE")


if __name__ == "__main__":
    main()
