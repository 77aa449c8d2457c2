"""petal_fast: fused kernels and drop-in modules for PETALface (WACV 2025).

Quality-weighted two-branch LoRA (:class:`PetalLinear`), margin-softmax losses
(:class:`MarginSoftmaxLoss`), batched BRISQUE (:mod:`petal_fast.quality`), the PETALface model
(:mod:`petal_fast.models`) and its training script. See the README and docs/design.md.

α reaches PetalLinear layers through ``with petal_fast.alpha_scope(alpha):``. ``petal_fast.quality`` is
the quality package (``petal_fast.quality.brisque(images)``), imported on first use.

Every setting (``PETAL_FAST_*``, read once at import) is in :mod:`petal_fast.settings`:
``petal_fast.settings.current()``, ``configure(...)``, ``override(...)``.
"""
from . import _openmp_env

_openmp_env.prepare()  # first: the OpenMP runtime reads its wait policy once, when `import torch` loads it

import importlib.util as _util  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

# Installed, `kernels/` is the subpackage petal_fast.kernels (setup.py's package_dir). In a plain
# source checkout (e.g. `python3 -m pytest -m gpu` on a GPU host whose torch is not this venv's)
# nothing maps it: let the repository root serve as a second search path for subpackages.
if _util.find_spec("petal_fast.kernels") is None and (_Path(__file__).resolve().parent.parent / "kernels").is_dir():
    __path__.append(str(_Path(__file__).resolve().parent.parent))

from .backend import requested_backend, use_backend  # noqa: E402
from .nn import (InjectionReport, PetalLinear, adapter_state_dict, alpha_scope, inject_petal,
                 load_adapter_state_dict, merge_and_unload, merge_petal, parameter_counts, unmerge_petal)
from .nn.margin_loss import MarginSoftmaxLoss

__version__ = "0.1.0"

__all__ = ["InjectionReport", "MarginSoftmaxLoss", "PetalLinear", "adapter_state_dict", "alpha_scope", "inject_petal",
           "load_adapter_state_dict", "merge_and_unload", "merge_petal", "parameter_counts", "requested_backend",
           "unmerge_petal", "use_backend"]


def __getattr__(name: str):
    """Subpackages on first use (``petal_fast.quality.brisque``): ``import petal_fast`` stays light."""
    if name == "quality":
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
