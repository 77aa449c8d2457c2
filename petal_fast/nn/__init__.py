"""Drop-in modules: PetalLinear, injection, merge/unmerge, adapter checkpoints, margin heads."""
from .adapters import adapter_state_dict, load_adapter_state_dict
from .context import AlphaScope, alpha_scope, current_alpha
from .inject import InjectionReport, inject_petal, merge_and_unload, merge_petal, parameter_counts, petal_layers, unmerge_petal
from .petal_linear import PetalLinear

__all__ = ["AlphaScope", "InjectionReport", "PetalLinear", "alpha_scope", "adapter_state_dict", "current_alpha", "inject_petal",
           "load_adapter_state_dict", "merge_and_unload", "merge_petal", "parameter_counts", "petal_layers", "unmerge_petal"]
