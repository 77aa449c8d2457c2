"""`import petal_fast` stays cheap: no torch._dynamo, Inductor or Triton until something compiles or
runs a Triton kernel (issue 23: they cost ~1 s, twice torch's own import, on every `petal-fast` command)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from petal_fast import backend

HEAVY = ("torch._dynamo", "torch._inductor", "triton")

FRESH = """
import json, sys
import {module}
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in {heavy!r}))
print(json.dumps(heavy))
"""


@pytest.mark.parametrize("module", ["petal_fast", "petal_fast.cli", "petal_fast.train", "petal_fast.quality"])
def test_import_loads_no_compiler_stack(module):
    out = subprocess.run([sys.executable, "-c", FRESH.format(module=module, heavy=HEAVY)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_constant_marker_is_what_torch_compiler_sets():
    """backend marks _resolve_constant as torch.compiler.assume_constant_result would, without importing Dynamo."""
    def probe():
        return 1

    marked = torch.compiler.assume_constant_result(probe)
    ours = backend._assume_constant_result(lambda: 1)
    assert marked is probe and vars(probe) == vars(ours) == {"_dynamo_marked_constant": True}
    assert backend._resolve_constant._dynamo_marked_constant is True
