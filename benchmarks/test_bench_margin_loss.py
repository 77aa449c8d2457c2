"""pytest-benchmark: the margin-loss suite's cases (``benchmarks/bench_margin_loss.py``), one test per provider."""
from __future__ import annotations

import pytest
import torch

from benchmarks import bench_margin_loss as bench
from benchmarks.conftest import CaseCache, bench_device, bench_quick, check_rows

_cache = CaseCache()


def providers_for(B: int, C: int, device: torch.device) -> list[str]:
    """The providers ``bench_margin_loss.run`` times at (B, C): materialised only where it fits."""
    names = ["fused"]
    if B * C * 4 * 6 <= bench.MATERIALISED_LIMIT:
        names.insert(0, "materialised")
    if device.type == "cpu" and C <= 10_000:
        names.append("fused_torch")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        quick, device = bench_quick(metafunc.config), bench_device(metafunc.config)
        shapes = bench.QUICK if quick else (bench.FULL_CUDA if device.type == "cuda" else bench.FULL_CPU)
        found = [(B, C, name) for B, C in shapes for name in providers_for(B, C, device)]
        metafunc.parametrize("case", found, ids=[f"B{B}-C{C}-{name}" for B, C, name in found])


def test_margin_loss(case, time_provider, request):
    device = bench_device(request.config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, C, name = case

    def build():
        torch.manual_seed(0)
        return bench._providers(B, C, device, dtype, providers_for(B, C, device))
    providers = _cache.get((B, C, str(device)), build)
    baseline = providers_for(B, C, device)[0]  # materialised where it fits, else fused: as bench_margin_loss.run
    rows = time_provider(f"{bench.SUITE} {bench.LOSS} B={B} C={C} D={bench.D} fwd+bwd", name, providers[name],
                         suite=bench.SUITE, baseline=baseline, dtype=str(dtype).replace("torch.", ""),
                         mode="fwd+bwd")
    check_rows(rows, device, name, baseline)
