"""What the OpenMP runtime must be told before it loads (docs/design.md §3.6). Imports nothing of torch.

torch's intra-op pool and petal_fast's C++ ops share one OpenMP runtime: the ``libgomp.so.1`` that
``import torch`` loads (the extension links the same soname, so the dynamic loader reuses torch's).
libgomp reads its wait policy (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) and nesting
(``OMP_MAX_ACTIVE_LEVELS``) once, in its constructor, when it is loaded: at ``import torch``. Its
default wait spins 300 000 pause iterations before an idle worker sleeps; on a shared machine the
spinning workers take the cores from the threads with work (measurements: docs/design.md §3.6).

So ``petal_fast/__init__.py`` runs this first, before anything imports torch: unless the user chose
(either wait variable set) it sets ``OMP_WAIT_POLICY=PASSIVE`` (idle workers sleep at once; Intel's
libiomp honours it too), and ``OMP_MAX_ACTIVE_LEVELS=1`` unless it or ``OMP_NESTED`` is set (a parallel region inside
another runs on one thread: BLAS calls inside the ops' parallel blocks never fan out). If torch
was imported first these come too late for this process; :data:`STATE` records which case holds,
for ``petal-fast info``. Child processes inherit the variables.
"""
from __future__ import annotations

import os
import sys

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_MAX_ACTIVE_LEVELS": "1"}

# "petal_fast": set here before torch loaded OpenMP; "user": a wait variable was set already;
# "too_late": torch was imported before petal_fast, the runtime keeps its default (spinning)
STATE = "unknown"


def prepare(environ=os.environ, modules=sys.modules) -> str:
    """Set the defaults above if OpenMP is not loaded yet; returns (and records) the case that holds."""
    global STATE
    if any(environ.get(v, "").strip() for v in WAIT_VARIABLES):
        STATE = "user"
    elif "torch" in modules:
        STATE = "too_late"
    else:
        environ["OMP_WAIT_POLICY"] = DEFAULTS["OMP_WAIT_POLICY"]
        STATE = "petal_fast"
    nesting_chosen = any(environ.get(v, "").strip() for v in ("OMP_MAX_ACTIVE_LEVELS", "OMP_NESTED"))
    if "torch" not in modules and not nesting_chosen:
        environ["OMP_MAX_ACTIVE_LEVELS"] = DEFAULTS["OMP_MAX_ACTIVE_LEVELS"]
    return STATE
