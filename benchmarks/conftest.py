"""pytest-benchmark integration: ``pytest benchmarks/ --benchmark-only`` runs the runner's cases.

Kept out of the normal test run (pyproject's ``testpaths`` is ``tests``). Options:
``--bench-quick`` the runner's ``--quick`` cases; ``--bench-device cpu|cuda`` (default: cuda when
available); ``--bench-rounds N`` timed calls per provider (default 3 quick, 5 full). Each test is
one provider at one case; ``benchmark.group`` collects the providers of a case so pytest-benchmark
compares them side by side. Each test also turns its timings into the suite's result rows (as the
runner writes them, with the ratio to the case's baseline once that provider has run) and checks
them: every column, the device named, finite positive medians inside their quantiles, ratios equal
to median / baseline median.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import pytest
import torch

from benchmarks.common import COLUMNS, device_name, summary_rows

# {case group: {provider: milliseconds per call}}: the providers of one case run one after another
_TIMED: dict[str, dict[str, list[float]]] = {}


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
def time_provider(request: pytest.FixtureRequest, benchmark) -> Callable[..., list[dict]]:
    """``time_provider(group, provider, fn, suite=, baseline=, dtype=, mode=)``: benchmark one
    provider call (synchronising on CUDA) and return the case's result rows so far."""
    config = request.config
    device = bench_device(config)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but torch sees no CUDA device")
    rounds = config.getoption("--bench-rounds") or (3 if bench_quick(config) else 5)

    def run(group: str, provider: str, fn: Callable[[], object], *, suite: str, baseline: str,
            dtype: str = "float32", mode: str = "") -> list[dict]:
        samples: list[float] = []

        def call() -> None:
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            samples.append((time.perf_counter() - t0) * 1e3)
        benchmark.group = group
        benchmark.extra_info.update(provider=provider, device=str(device))
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
        timed = _TIMED.setdefault(group, {})
        timed[provider] = samples[-rounds:]  # without the warm-up call (all of them if benchmarks are disabled)
        return summary_rows(suite, device, group, group, dtype, mode, dict(timed), baseline)
    return run


def check_rows(rows: list[dict], device: torch.device, provider: str, baseline: str) -> None:
    """The result rows of one case: complete, naming the device, with sane medians and ratios."""
    assert rows and any(r["provider"] == provider for r in rows), f"no row for {provider}"
    by_provider = {r["provider"]: r for r in rows}
    base = by_provider.get(baseline)
    for r in rows:
        assert list(r) == COLUMNS, sorted(set(COLUMNS) ^ set(r))
        assert r["device"] == device_name(device) and r["device"], r["device"]
        med, q20, q80 = (float(r[k]) for k in ("median", "q20", "q80"))
        assert all(math.isfinite(v) and v > 0 for v in (med, q20, q80)), r
        assert q20 <= med <= q80 and r["unit"] == "ms" and r["metric"] == "time", r
        if base is None:  # the baseline did not run (skipped or not yet): no ratio to show
            assert r["ratio"] == "", r
        else:
            assert float(r["ratio"]) == pytest.approx(med / float(base["median"]), rel=1e-3, abs=6e-5), r  # 4 decimals
    if base is not None:
        assert float(base["ratio"]) == 1.0


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
