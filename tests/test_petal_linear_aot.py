"""Ahead-of-time compile check of the PetalLinear Triton kernels, without a GPU.

Every rung of the Hopper tile table is compiled for sm_90a (bfloat16, rank 8 per branch, p = 0 and
p > 0) with a launch's specialisation, and ptxas' report is read: no kernel spills, the forward and dX
GEMMs move their big operands with TMA (``cp.async.bulk.tensor`` loads and stores in the PTX) and
fit the SM's shared memory. The Ampere / sm_80 pointer kernels (the fallback) must compile too.
Triton's bundled ptxas does the work, so this runs on a CPU; each architecture compiles in its own
subprocess (the kernels must be real JIT functions, and this process may run the interpreter).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from petal_fast.kernels.petal_linear_config import KERNELS, TMA_KERNELS

CODE = ("import json, torch; from petal_fast.kernels.tune_petal_linear import compile_check as c; "
        "print(json.dumps([c({arch}, torch.bfloat16, 8, 2, dropout) for dropout in {dropouts}]))")
HOPPER_SHARED, AMPERE_SHARED = 227 * 1024, 99 * 1024  # per block: H100/H200; the smallest sm_8x (RTX 30xx/40xx)


def _start(arch: int, dropouts: tuple[bool, ...]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, "-c", CODE.format(arch=arch, dropouts=dropouts)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(proc: subprocess.Popen) -> list[list[dict]]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_kernels_compile_for_hopper_with_tma_and_without_spills():
    hopper, ampere = _start(90, (False, True)), _start(80, (False, True))  # two compilers at once (two cores)
    for dropout, rows in zip((False, True), _rows(hopper)):
        assert {r["kernel"] for r in rows} == set(KERNELS) - ({"bwd_onepass"} if dropout else set()) | {"finalize"}
        for row in rows:
            assert row["spill_bytes"] == 0, row
            assert 0 <= row["shared_bytes"] <= HOPPER_SHARED, row
            tma = row["kernel"] in TMA_KERNELS
            assert row["function"].endswith("_tma_kernel") == tma, row
            assert (row["tma_loads"] > 0 and row["tma_stores"] > 0) == tma, row
    for dropout, rows in zip((False, True), _rows(ampere)):
        assert {r["kernel"] for r in rows} == set(KERNELS) - ({"bwd_onepass"} if dropout else set()) | {"finalize"}
        for row in rows:
            assert not row["function"].endswith("_tma_kernel") and row["tma_loads"] == row["tma_stores"] == 0, row
            assert row["spill_bytes"] == 0 and 0 <= row["shared_bytes"] <= AMPERE_SHARED, row
