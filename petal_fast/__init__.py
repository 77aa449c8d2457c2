"""petal_fast: fused kernels and drop-in modules for PETALface (WACV 2025).

Quality-weighted two-branch LoRA (:class:`PetalLinear`), margin-softmax losses
(:class:`MarginSoftmaxLoss`), batched BRISQUE (:mod:`petal_fast.quality`), the PETALface model
(:mod:`petal_fast.models`) and its training script. See the README and DESIGN.md.

``petal_fast.quality`` is both the quality package (``petal_fast.quality.brisque(images)``) and,
called, the context manager that hands α to PetalLinear layers (``with petal_fast.quality(alpha):``).
"""
from .backend import requested_backend, use_backend
from .nn import (InjectionReport, PetalLinear, adapter_state_dict, inject_petal, load_adapter_state_dict,
                 merge_petal, parameter_counts, quality, unmerge_petal)
from .nn.margin import MarginSoftmaxLoss

__version__ = "0.1.0"

__all__ = ["InjectionReport", "MarginSoftmaxLoss", "PetalLinear", "adapter_state_dict", "inject_petal",
           "load_adapter_state_dict", "merge_petal", "parameter_counts", "quality", "requested_backend",
           "unmerge_petal", "use_backend"]
