"""petal_fast: fused kernels and drop-in modules for PETALface (WACV 2025).

Quality-weighted two-branch LoRA (:class:`PetalLinear`), margin-softmax losses, batched BRISQUE,
the PETALface model and its training script. See DESIGN.md and the README.
"""
from .backend import requested_backend, use_backend
from .nn import (InjectionReport, PetalLinear, adapter_state_dict, inject_petal, load_adapter_state_dict,
                 merge_petal, parameter_counts, quality, unmerge_petal)

__version__ = "0.1.0"

__all__ = ["InjectionReport", "PetalLinear", "adapter_state_dict", "inject_petal", "load_adapter_state_dict",
           "merge_petal", "parameter_counts", "quality", "requested_backend", "unmerge_petal", "use_backend"]
