"""pytest-benchmark: the BRISQUE suite's cases (``benchmarks/bench_brisque.py``), one test per provider."""
from __future__ import annotations

import pytest

from benchmarks import bench_brisque as bench
from benchmarks.conftest import CaseCache, bench_device, bench_quick, check_rows

_cache = CaseCache()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        quick, device = bench_quick(metafunc.config), bench_device(metafunc.config)
        shapes = bench.QUICK if quick else (bench.FULL_CUDA if device.type == "cuda" else bench.FULL)
        providers = ("package", "fused", "torch") if device.type == "cpu" else ("fused",)
        found = [(*s, p) for s in shapes for p in providers]
        metafunc.parametrize("case", found, ids=[f"B{b}-{h}x{w}-{p}" for b, h, w, p in found])


def test_brisque(case, time_provider, request):
    device = bench_device(request.config)
    b, h, w, provider = case
    images = _cache.get((b, h, w, str(device)), lambda: bench._images(b, h, w, device))
    if provider == "package":
        package = bench._package()
        if package is None:
            pytest.skip("the brisque package is not installed")
        arrays = [im.permute(1, 2, 0).double().numpy() for im in images]
        fn = lambda: [package.score(a) for a in arrays]  # noqa: E731
    else:
        fn = bench._fused(images, "auto" if provider == "fused" else "torch")
    baseline = "package" if device.type == "cpu" else "fused"  # as bench_brisque.run
    rows = time_provider(f"brisque B={b} H={h} W={w}", provider, fn, suite=bench.SUITE, baseline=baseline,
                         mode="score")
    check_rows(rows, device, provider, baseline)
