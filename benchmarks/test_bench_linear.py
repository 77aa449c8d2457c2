"""pytest-benchmark: the PetalLinear suite's cases (``benchmarks/bench_petal_linear.py``), one test per provider."""
from __future__ import annotations

import pytest
import torch

from benchmarks import bench_petal_linear as bench
from benchmarks.conftest import CaseCache, bench_device, bench_quick

RANK = 8
PROVIDERS = ("base", "fused", "addmm", "reference", "fused_1b", "peft")
_cache = CaseCache()


def cases(quick: bool, device: torch.device) -> list[tuple]:
    """(M, K, N, rank, p, mode) as ``bench_petal_linear.run`` builds them."""
    cuda = device.type == "cuda"
    shapes = bench.QUICK_SHAPES if quick else bench.PETALFACE_SHAPES + (bench.CUDA_SQUARE if cuda else bench.CPU_SQUARE)
    ranks = (RANK, 16) if cuda and not quick else (RANK,)
    return [(*s, r, p, mode) for s in shapes for r in ranks for p in (0.0, 0.1) for mode in ("fwd", "full")
            if not (r != RANK and s not in bench.CUDA_SQUARE)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        found = cases(bench_quick(metafunc.config), bench_device(metafunc.config))
        metafunc.parametrize("case", found, ids=[f"M{m}-K{k}-N{n}-r{r}-p{p}-{mode}" for m, k, n, r, p, mode in found])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_petal_linear(case, provider, time_provider, request):
    device = bench_device(request.config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m, k, n, r, p, mode = case

    def build():
        torch.manual_seed(0)
        return bench._providers(m, k, n, r, p, mode, device, dtype)[0]
    providers = _cache.get((case, str(device)), build)
    if provider not in providers:
        pytest.skip(f"{provider} unavailable (peft not installed)")
    time_provider(f"linear M={m} K={k} N={n} r{r} p{p} {mode}", provider, providers[provider])
