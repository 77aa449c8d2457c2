"""Threads (petal_fast.threads, petal_fast._openmp_env; docs/design.md §3.6): how many, how idle ones
wait, no nesting, worker processes single-threaded, and what `petal-fast info` says about it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from petal_fast import _openmp_env, info, settings, threads

CLEAN = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_MAX_ACTIVE_LEVELS", "OMP_NESTED", "OMP_NUM_THREADS",
         "OMP_DISPLAY_ENV", *settings.ENV.values())


def _python(code: str, env: dict[str, str] | None = None, prefix: list[str] | None = None) -> str:
    base = {k: v for k, v in os.environ.items() if k not in CLEAN}
    out = subprocess.run([*(prefix or []), sys.executable, "-c", code], env={**base, **(env or {})},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return (out.stdout.strip().splitlines() or [""])[-1] + "\n" + out.stderr


def test_openmp_defaults_are_set_only_before_torch_and_only_if_unset():
    env: dict[str, str] = {}
    assert _openmp_env.prepare(env, {}) == "petal_fast"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_MAX_ACTIVE_LEVELS": "1"}
    env = {"GOMP_SPINCOUNT": "10000", "OMP_NESTED": "true"}
    assert _openmp_env.prepare(env, {}) == "user" and env == {"GOMP_SPINCOUNT": "10000", "OMP_NESTED": "true"}
    env = {}
    assert _openmp_env.prepare(env, {"torch": torch}) == "too_late" and env == {}


@pytest.mark.skipif(sys.platform != "linux", reason="libgomp's OMP_DISPLAY_ENV (Linux torch wheels)")
def test_the_openmp_runtime_reads_them_when_petal_fast_comes_first():
    """libgomp prints its settings when it loads: GOMP_SPINCOUNT 0 is the passive wait."""
    first = _python("import petal_fast", {"OMP_DISPLAY_ENV": "VERBOSE"})
    if "OPENMP DISPLAY ENVIRONMENT" not in first:
        pytest.skip("torch's OpenMP runtime is not libgomp")
    assert "GOMP_SPINCOUNT = '0'" in first and "OMP_MAX_ACTIVE_LEVELS = '1'" in first
    late = _python("import torch, petal_fast; from petal_fast import threads; print(threads.wait_policy())",
                   {"OMP_DISPLAY_ENV": "VERBOSE"})
    assert "GOMP_SPINCOUNT = '300000'" in late and late.startswith("spin, then sleep")
    mine = _python("import petal_fast; from petal_fast import threads; print(threads.wait_policy())",
                   {"OMP_WAIT_POLICY": "active"})
    assert mine.startswith("as set in the environment (OMP_WAIT_POLICY=active)")


def test_the_threads_setting_sizes_torchs_pool():
    before, setting = torch.get_num_threads(), settings.current().threads
    settings.configure(threads=1)
    try:
        assert torch.get_num_threads() == 1
    finally:
        settings.configure(threads=setting)
    assert torch.get_num_threads() == before == threads.choose(settings.current().threads).threads
    with pytest.raises(ValueError, match=r"process-wide thread pool.*configure\(threads=\.\.\.\)"):
        with settings.override(threads=1):  # a block of one thread cannot resize the process's pool
            pass
    assert threads.choose(3) == threads.Choice(3, "the threads setting (PETAL_FAST_THREADS=3)")
    auto = threads.choose(0)
    assert 1 <= auto.threads <= threads.available_cores() and auto.why.startswith("auto")


def test_auto_is_the_affinity_mask_even_after_torch_chose_more():
    """torch sized its pool at import; a mask set later (or a larger earlier set_num_threads) is capped."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity API")
    cpu = min(os.sched_getaffinity(0))
    out = _python(f"import os, torch; torch.set_num_threads(4); os.sched_setaffinity(0, {{{cpu}}}); "
                  "import petal_fast; print(torch.get_num_threads())")
    assert out.startswith("1\n")
    assert _python("import petal_fast, torch; print(torch.get_num_threads())",
                   {"PETAL_FAST_THREADS": "3"}).startswith("3\n")
    assert _python("import petal_fast, torch; print(torch.get_num_threads())",
                   {"OMP_NUM_THREADS": "1"}).startswith("1\n")  # torchrun's one thread per rank stays


@pytest.mark.skipif(shutil.which("taskset") is None, reason="taskset (util-linux) not installed")
def test_under_taskset_one_cpu_one_thread():
    cpu = min(os.sched_getaffinity(0))
    out = _python("import petal_fast, torch; from petal_fast import threads; "
                  "print(torch.get_num_threads(), threads.affinity_cores())", prefix=["taskset", "-c", str(cpu)])
    assert out.startswith("1 1\n")


def test_a_cpu_quota_caps_the_cores(tmp_path):
    (tmp_path / "proc").write_text("0::/jobs/run7\n")
    root = tmp_path / "cg"
    (root / "jobs" / "run7").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "jobs" / "cpu.max").write_text("250000 100000\n")  # 2.5 CPUs for the parent group
    (root / "jobs" / "run7" / "cpu.max").write_text("max 100000\n")
    assert threads.quota_cores(tmp_path / "proc", root) == 2.5
    (root / "jobs" / "cpu.max").write_text("max 100000\n")
    assert threads.quota_cores(tmp_path / "proc", root) is None
    (tmp_path / "v1").write_text("4:cpu:/\n")  # cgroup v1 only: no quota read
    assert threads.quota_cores(tmp_path / "v1", root) is None
    assert threads.quota_cores(tmp_path / "missing", root) is None


class _ThreadsInWorker(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return torch.get_num_threads()  # the pool torch, OpenMP and the C++ ops (at::get_num_threads) use


def test_dataloader_workers_and_process_pools_run_one_thread():
    loader = torch.utils.data.DataLoader(_ThreadsInWorker(), batch_size=None, num_workers=1)
    assert list(loader) == [1, 1]
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(1, initializer=threads.single_threaded) as pool:
        assert pool.submit(torch.get_num_threads).result() == 1


def test_info_says_how_many_why_and_how_they_wait():
    text, _ = info.report()
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("threads "))
    assert f"{torch.get_num_threads()} intra-op" in lines[head] and threads.choose(0).why in lines[head]
    assert f"{threads.affinity_cores()} in this process's affinity mask" in lines[head + 1]
    assert lines[head + 2].split(":", 1)[1].strip() == threads.wait_policy()
