"""pytest-benchmark: the end-to-end suite's cases (``benchmarks/bench_e2e.py``), one test per provider."""
from __future__ import annotations

import pytest
import torch

from benchmarks import bench_e2e as bench
from benchmarks.conftest import CaseCache, bench_device, bench_quick, check_rows

_cache = CaseCache()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        quick, device = bench_quick(metafunc.config), bench_device(metafunc.config)
        if device.type == "cuda":
            found = bench.CUDA_QUICK if quick else bench.CUDA_CASES
        else:
            found = bench.CPU_QUICK if quick else bench.CPU_CASES
        metafunc.parametrize("case", found, ids=[f"{p}-B{b}-C{c}" for p, b, c in found])


@pytest.mark.parametrize("provider", ("petal_fast", "reference"))
@pytest.mark.parametrize("step", ("train_step", "quality_alpha", "inference"))
def test_e2e(case, step, provider, time_provider, request):
    device = bench_device(request.config)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset, batch, classes = case
    model, reference, images, labels = _cache.get((case, str(device)),
                                                  lambda: bench.build(preset, classes, batch, device, dtype))
    target, backend = (model, None) if provider == "petal_fast" else (reference, "reference")
    if step == "train_step":
        target.train()
        fn = bench.train_step_fn(target, images, labels, backend)
    elif step == "quality_alpha":
        target.train()
        fn = (lambda: target.alpha(images)) if backend is None else (
            lambda: bench._with_backend(backend, target.alpha, images))
    else:
        target.eval()
        fn = bench.inference_fn(target, images, backend)
    rows = time_provider(f"e2e {step} {preset} B={batch} C={classes}", provider, fn, suite=bench.SUITE,
                         baseline="reference", dtype=str(dtype).replace("torch.", ""), mode=step)
    check_rows(rows, device, provider, "reference")
