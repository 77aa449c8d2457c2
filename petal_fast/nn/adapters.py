"""Adapter-only checkpoints (PEFT-style): save and load just the LoRA tensors of a model."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .petal_linear import PetalLinear

ADAPTER_KEYS = ("lora_A", "lora_B")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A": …, "<module>.lora_B": …}`` for every PetalLinear, detached copies."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, PetalLinear):
            prefix = f"{name}." if name else ""
            for key in ADAPTER_KEYS:
                out[prefix + key] = getattr(module, key).detach().clone()
    return out


def load_adapter_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> list[str]:
    """Copy adapter tensors into ``model``'s PetalLinear layers.

    With ``strict`` every adapter of the model must be present and no extra key may be given;
    shapes must match. Returns the list of keys that were loaded. Raises ``KeyError``/``ValueError``
    listing the offending keys.
    """
    own = {}
    merged = []
    for name, module in model.named_modules():
        if isinstance(module, PetalLinear):
            prefix = f"{name}." if name else ""
            for key in ADAPTER_KEYS:
                own[prefix + key] = getattr(module, key)
            if module.merged:
                merged.append(name or "<model>")
    if merged:  # W holds the old adapters' ΔW: new adapters would make unmerge_ subtract the wrong ΔW
        raise RuntimeError(f"cannot load adapters into merged layers ({', '.join(merged[:5])}"
                           f"{' …' if len(merged) > 5 else ''}): call unmerge_petal(model) first; nothing was loaded")
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(f"adapter state dict does not match the model: missing {missing}, unexpected {unexpected}")
    bad = [f"{k}: model {tuple(own[k].shape)} vs checkpoint {tuple(state_dict[k].shape)}"
           for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if bad:
        raise ValueError("adapter shape mismatch: " + "; ".join(bad))
    loaded = []
    with torch.no_grad():
        for key, param in own.items():
            if key in state_dict:
                param.copy_(state_dict[key].to(param.dtype))
                loaded.append(key)
    return loaded
