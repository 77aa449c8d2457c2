"""pytest-benchmark: the host suite's cases (``benchmarks/bench_host.py``), one test per provider.

The suite measures this CPU (the CUDA host path on stand-ins, launches stubbed), so it runs with
``--bench-device cpu`` (the default without a GPU). Each call here enters its own ``alpha_scope``: the
first layer of a step, which pays α's check and branch weights; the runner holds one scope over its
calls (the other layers).
"""
from __future__ import annotations

import os

import pytest

from benchmarks import bench_host as bench
from benchmarks.conftest import CaseCache, bench_device, bench_quick, check_rows
from benchmarks.cuda_stub import standin_cuda
from petal_fast import alpha_scope

PROVIDERS = ("base", "fused", "minimal")
_cache = CaseCache()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        shapes = bench.petalface_shapes()
        shapes = shapes[-1:] if bench_quick(metafunc.config) else shapes
        found = [(m, k, n, images, setting, mode) for m, k, n, images in shapes for setting in bench.SETTINGS
                 for mode in ("fwd", "bwd") if not (setting == "infer" and mode == "bwd")]
        metafunc.parametrize("case", found, ids=[f"M{m}-K{k}-N{n}-{s}-{mode}" for m, k, n, _, s, mode in found])


@pytest.fixture(scope="module")
def stand_ins():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted, the host path needs Triton's JIT binder")
    with standin_cuda(), bench.hopper_design():
        yield


@pytest.mark.parametrize("provider", PROVIDERS)
def test_host(case, provider, stand_ins, time_provider, request):
    device = bench_device(request.config)
    if device.type != "cpu":
        pytest.skip("the host suite measures this CPU: run with --bench-device cpu")
    m, k, n, images, setting, mode = case
    fwd, bwd, state = _cache.get(case[:5], lambda: bench.build(m, k, n, images, setting))
    call = (fwd if mode == "fwd" else bwd)[provider]

    def in_scope():
        with alpha_scope(state["alpha"]):
            return call()
    rows = time_provider(f"host M={m} K={k} N={n} {setting} {mode}", provider, in_scope, suite=bench.SUITE,
                         baseline="base", mode=mode)
    check_rows(rows, device, provider, "base")
