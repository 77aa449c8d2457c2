"""pytest-benchmark integration: ``pytest benchmarks/ --benchmark-only`` runs the runner's cases.

Kept out of the normal test run (pyproject's ``testpaths`` is ``tests``). Options:
``--bench-quick`` the runner's ``--quick`` cases; ``--bench-device cpu|cuda`` (default: cuda when
available); ``--bench-rounds N`` timed calls per provider (default 3 quick, 5 full). Each test is
one provider at one case; ``benchmark.group`` collects the providers of a case so pytest-benchmark
compares them side by side.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("petal_fast benchmarks")
    group.addoption("--bench-quick", action="store_true", help="tiny shapes (the runner's --quick cases)")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    group.addoption("--bench-rounds", type=int, default=None, help="timed calls per provider (default 3 quick, 5 full)")


def bench_device(config: pytest.Config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_quick(config: pytest.Config) -> bool:
    return bool(config.getoption("--bench-quick"))


@pytest.fixture
def time_provider(request: pytest.FixtureRequest, benchmark) -> Callable[[str, str, Callable[[], object]], None]:
    """``time_provider(group, provider, fn)``: benchmark one provider call, synchronising on CUDA."""
    config = request.config
    device = bench_device(config)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but torch sees no CUDA device")
    rounds = config.getoption("--bench-rounds") or (3 if bench_quick(config) else 5)

    def run(group: str, provider: str, fn: Callable[[], object]) -> None:
        def call() -> None:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        benchmark.group = group
        benchmark.extra_info.update(provider=provider, device=str(device))
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
    return run


class CaseCache:
    """Keeps the providers of the last case built: the tests of one case run one after another."""

    def __init__(self) -> None:
        self.key: object = None
        self.value: object = None

    def get(self, key: object, build: Callable[[], object]) -> object:
        if key != self.key:
            self.key, self.value = None, None  # free the previous case's tensors first
            self.value, self.key = build(), key
        return self.value
