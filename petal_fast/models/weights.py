"""Model weight files: released PETALface files, pretrained backbones, petal_fast's own files.

(Training checkpoints, which also hold optimizer, schedule and RNG state, are
``petal_fast.training.state``; this module only reads and writes a model's weights.)

Three sources load into a model through :func:`load_petalface_checkpoint`:

(a) a released PETALface checkpoint (layout of ``petalface_swin_state_dict.txt``):
    ``<layer>.trainable_lora_down/up.weight`` is the branch weighted by (1 − α) → ``lora_A[0]/lora_B[0]``,
    ``<layer>.trainable_lora_down2/up2.weight`` the branch weighted by α → ``lora_A[1]/lora_B[1]``,
    ``feature_layer.2.trainable_lora_down/up`` the single-branch feature LoRA;
(b) a pretrained backbone without adapter keys (arcface_torch style), to start PETALface training;
(c) petal_fast's own files: the trainable part (:func:`trainable_state_dict`: adapters, head and the
    BatchNorm running statistics) or the full model.

Files may wrap the state dict (``state_dict`` / ``model`` / ``module`` / ``backbone`` keys) and carry a
DDP ``module.`` prefix. Checkpoint files are untrusted input: they are read with
``torch.load(..., weights_only=True)`` (or safetensors); a file that needs arbitrary pickled objects is
refused with an explanation, never unpickled.
"""
from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch
from torch import nn

from petal_fast.atomic_files import atomic_save, atomic_write
from petal_fast.nn import PetalLinear

StateDict = Mapping[str, torch.Tensor]
Source = Union[str, "os.PathLike[str]", Mapping[str, Any]]

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "backbone")
_RELEASED = re.compile(r"^(?P<layer>.+)\.trainable_lora_(?P<kind>down|up)(?P<branch>2?)\.weight$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model; the message lists the keys."""


@dataclass
class LoadReport:
    kind: str  # "full", "backbone" or "adapters"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"loaded {len(self.loaded)} tensors ({self.kind} checkpoint)"
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                s += f"; {name} {len(keys)}: " + ", ".join(keys[:20]) + (" …" if len(keys) > 20 else "")
        return s


def safe_load(path: Union[str, "os.PathLike[str]"]) -> dict[str, Any]:
    """Read a checkpoint file without executing code: safetensors, or ``torch.load(weights_only=True)``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: the checkpoint file is empty (0 bytes)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({size} bytes): {err}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refusing to load: the file needs arbitrary pickled Python objects, which could run code "
            f"when unpickled ({str(err).splitlines()[0]}). petal_fast only reads tensors and plain containers "
            "(torch.load weights_only=True, or safetensors). If you trust the file, load it yourself with "
            "torch.load(path, weights_only=False) and pass the state dict, or re-save its tensors with "
            "torch.save(state_dict) / safetensors.") from err
    except Exception as err:  # noqa: BLE001 - truncated zip, wrong format, …: name the file and the problem
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint ({size} bytes): {first}. The file is truncated, "
                              "corrupt or not a torch checkpoint (torch.save / safetensors)") from None


def unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside wrapping dicts and strip a DDP ``module.`` prefix."""
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            raise CheckpointError(f"no state dict found: top-level keys {sorted(map(str, obj))[:20]} hold no tensors "
                                  f"and none of {WRAPPER_KEYS} wraps one")
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"a checkpoint must be a dict of tensors, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in tensors.items()}


def from_released(state_dict: StateDict) -> dict[str, torch.Tensor]:
    """Released names → petal_fast names: ``trainable_lora_{down,up}{,2}`` → stacked ``lora_A``/``lora_B``."""
    out, parts = {}, {}
    for key, value in state_dict.items():
        m = _RELEASED.match(key)
        if m is None:
            out[key] = value
        else:
            parts.setdefault(m["layer"], {})[(m["kind"], 1 if m["branch"] else 0)] = value
    incomplete = []
    for layer, p in parts.items():
        branches = 2 if any(b == 1 for _, b in p) else 1
        need = [(kind, b) for kind in ("down", "up") for b in range(branches)]
        if any(k not in p for k in need):
            incomplete += [f"{layer}.trainable_lora_{kind}{'2' if b else ''}.weight"
                           for kind, b in need if (kind, b) not in p]
            continue
        out[f"{layer}.lora_A"] = torch.stack([p[("down", b)] for b in range(branches)])
        out[f"{layer}.lora_B"] = torch.stack([p[("up", b)] for b in range(branches)])
    if incomplete:
        raise CheckpointError("released checkpoint has incomplete LoRA pairs; missing " + ", ".join(sorted(incomplete)))
    return out


def to_released(model: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict in the released PETALface layout (inverse of :func:`from_released`)."""
    backbone = getattr(model, "backbone", model)
    out = {}
    for key, value in backbone.state_dict().items():
        layer, _, name = key.rpartition(".")
        if name in ("lora_A", "lora_B") and isinstance(backbone.get_submodule(layer), PetalLinear):
            kind = "down" if name == "lora_A" else "up"
            for b in range(value.shape[0]):
                out[f"{layer}.trainable_lora_{kind}{'2' if b else ''}.weight"] = value[b].clone()
        else:
            out[key] = value.clone()
    return out


def _is_adapter(key: str) -> bool:
    return key.endswith(".lora_A") or key.endswith(".lora_B")


def _is_derived(key: str) -> bool:
    """Buffers recomputed at construction (or absent from older files): loaded if present, never required."""
    return key.endswith((".attn_mask", ".relative_position_index", ".num_batches_tracked"))


def _is_bn_stat(key: str) -> bool:
    return key.endswith((".running_mean", ".running_var", ".num_batches_tracked"))


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The part of a model that training changes: trainable parameters (adapters, head), the
    BatchNorm running statistics (updated in train mode although the backbone is frozen) and the
    calibrated quality → α mapping (τ, k)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in _tensors(model).items()
            if k in trainable or _is_bn_stat(k) or k.startswith("quality_to_alpha.")}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model (backbone, adapters, head, quality mapping), detached copies."""
    return {k: v.detach().clone() for k, v in _tensors(model).items()}


def save_checkpoint(model: nn.Module, path: Union[str, "os.PathLike[str]"], trainable_only: bool = True,
                    metadata: Mapping[str, Any] | None = None,
                    replace: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write the trainable part (default) or the whole model; ``.safetensors`` paths use safetensors.

    ``metadata`` (plain numbers, strings, lists, dicts, tensors) is stored beside the state dict, for
    example the calibrated quality threshold τ; it must stay loadable with ``weights_only=True``.
    ``replace`` swaps tensors of the state dict (a class-sharded head's gathered ``head.weight``).
    The file is written atomically (temporary file + rename): a killed process never leaves half of it.
    """
    sd = trainable_state_dict(model) if trainable_only else full_state_dict(model)
    sd.update(replace or {})
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import save
        data = save({k: v.contiguous() for k, v in sd.items()},
                    metadata={k: str(v) for k, v in (metadata or {}).items()})
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_save({"state_dict": sd, "metadata": dict(metadata or {})}, path)


def load_petalface_checkpoint(model: nn.Module, source: Source, strict: bool = True) -> LoadReport:
    """Load (a) a released PETALface file, (b) a pretrained backbone or (c) a petal_fast file into ``model``.

    ``model`` is a PetalFace / FaceModel (keys under ``backbone.`` and ``head.``) or a bare backbone.
    Which keys are required depends on what the checkpoint holds: a full checkpoint must cover every
    backbone tensor, a backbone-only one every non-adapter tensor (adapters keep their initialisation,
    B = 0), an adapter-only one every adapter. The margin head and buffers rebuilt at construction
    (``attn_mask``, ``relative_position_index``, ``num_batches_tracked``) are never required. With ``strict``,
    missing, unexpected or wrongly shaped keys raise :class:`CheckpointError` listing them; otherwise
    they are reported in the returned :class:`LoadReport` (and warned about) and the rest is loaded.
    """
    raw = safe_load(source) if isinstance(source, (str, os.PathLike)) else source
    ckpt = from_released(unwrap_state_dict(raw))
    own = _tensors(model)
    has_backbone = isinstance(getattr(model, "backbone", None), nn.Module)

    def to_model_key(key: str) -> str | None:
        if key in own:
            return key
        if has_backbone and f"backbone.{key}" in own:
            return f"backbone.{key}"
        if not has_backbone and key.startswith("backbone.") and key[len("backbone."):] in own:
            return key[len("backbone."):]  # a petal_fast model file loaded into a bare backbone
        return None

    mapped, unexpected = {}, []
    for key, value in ckpt.items():
        target = to_model_key(key)
        if target is None:
            unexpected.append(key)
        else:
            mapped[target] = value
    in_backbone = [k for k in own if (not has_backbone or k.startswith("backbone.")) and not _is_derived(k)]
    got_adapters = any(_is_adapter(k) for k in mapped)
    got_base = any(not _is_adapter(k) and not _is_bn_stat(k) for k in mapped if k in in_backbone)
    if got_base and got_adapters:
        kind, required = "full", in_backbone
    elif got_base:
        kind, required = "backbone", [k for k in in_backbone if not _is_adapter(k)]
    else:
        kind, required = "adapters", [k for k in in_backbone if _is_adapter(k)]
    report = LoadReport(kind=kind, missing=sorted(set(required) - set(mapped)), unexpected=sorted(unexpected))
    report.mismatched = sorted(f"{k}: model {tuple(own[k].shape)} vs checkpoint {tuple(v.shape)}"
                               for k, v in mapped.items() if tuple(v.shape) != tuple(own[k].shape))
    if report.missing or report.unexpected or report.mismatched:
        if strict:
            raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: {report}")
        warnings.warn(f"load_petalface_checkpoint: {report}", RuntimeWarning, stacklevel=2)
    bad = {m.split(":")[0] for m in report.mismatched}
    with torch.no_grad():
        for key, value in mapped.items():
            if key not in bad:
                own[key].copy_(value.to(own[key].dtype))
                report.loaded.append(key)
    return report
