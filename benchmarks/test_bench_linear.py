"""pytest-benchmark: the PetalLinear suite's cases (``benchmarks/bench_petal_linear.py``), one test per provider."""
from __future__ import annotations

import pytest
import torch

from benchmarks import bench_petal_linear as bench
from benchmarks.conftest import CaseCache, bench_device, bench_quick, check_rows

RANK = 8
PROVIDERS = ("base", "fused", "fused_onepass", "addmm", "reference", "fused_1b", "peft")
_cache = CaseCache()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        found = bench.cases(bench_quick(metafunc.config), bench_device(metafunc.config), RANK)
        metafunc.parametrize("case", found, ids=[f"M{m}-K{k}-N{n}-r{r}-p{p}-{mode}" for m, k, n, r, p, mode in found])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_petal_linear(case, provider, time_provider, request):
    device = bench_device(request.config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m, k, n, r, p, mode = case

    def build():
        torch.manual_seed(0)
        return bench.build_case(m, k, n, r, p, mode, device, dtype)[0]
    calls = _cache.get((case, str(device)), build)
    if provider not in calls:
        pytest.skip(f"{provider} unavailable on {device.type} (fused_onepass: CUDA only; peft: not installed)")
    rows = time_provider(f"linear M={m} K={k} N={n} r{r} p{p} {mode}", provider, calls[provider], suite=bench.SUITE,
                         baseline="base", dtype=str(dtype).replace("torch.", ""), mode=mode)
    check_rows(rows, device, provider, "base")
