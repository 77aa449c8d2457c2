"""Drop PetalLinear into any existing model (PEFT-style injection by target names)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

from torch import nn

from .petal_linear import PetalLinear

Targets = Union[str, Iterable[str], Callable[[str, nn.Module], bool], "re.Pattern[str]"]


@dataclass
class InjectionReport:
    replaced: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of all parameters."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"replaced {len(self.replaced)} linear layers; trainable {self.trainable:,} / "
                f"{self.total:,} parameters ({100 * self.share:.3f}%)")


def _matcher(targets: Targets) -> Callable[[str, nn.Module], bool]:
    if callable(targets) and not isinstance(targets, re.Pattern):
        return targets
    if isinstance(targets, re.Pattern):
        return lambda name, _m: targets.search(name) is not None
    if isinstance(targets, str):
        targets = [targets]
    suffixes = list(targets)
    if not suffixes:
        raise ValueError("targets is empty: name at least one module suffix, a regex or a predicate")
    return lambda name, _m: any(name == s or name.endswith("." + s) for s in suffixes)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared Parameters counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def inject_petal(model: nn.Module, targets: Targets, rank: int = 8, scale: float = 1.0, dropout: float = 0.0,
                 branches: int = 2, freeze_base: bool = True) -> InjectionReport:
    """Replace every ``nn.Linear`` whose qualified name matches ``targets`` by a PetalLinear.

    ``targets``: a name suffix or list of suffixes (``"attn.qkv"`` matches ``layers.0.attn.qkv``),
    a compiled regex searched in the name, or a predicate ``f(name, module) -> bool``. The
    original weight and bias Parameters are reused. With ``freeze_base`` every parameter except
    the adapters is frozen. Returns an :class:`InjectionReport`.
    """
    match = _matcher(targets)
    chosen = [(n, m) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and not isinstance(m, PetalLinear) and match(n, m)]
    if not chosen:
        raise ValueError(f"inject_petal: no nn.Linear in {type(model).__name__} matches targets={targets!r}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    report = InjectionReport()
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = PetalLinear.from_linear(linear, rank=rank, scale=scale, dropout=dropout, branches=branches)
        layer.train(linear.training)
        setattr(parent, child, layer)
        report.replaced.append(name)
    number_streams(model)
    report.trainable, report.total = parameter_counts(model)
    return report


def number_streams(model: nn.Module) -> None:
    """Give the model's PetalLinear layers the dropout streams 1, 2, … in module order: layers sharing a
    forward pass's seed draw different masks, and the same model built again (another run, a resumed
    one) draws the same masks."""
    for i, (_, layer) in enumerate(petal_layers(model), start=1):
        layer.stream = i


def petal_layers(model: nn.Module) -> list[tuple[str, PetalLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PetalLinear)]


def merge_petal(model: nn.Module, alpha: float | None = None) -> int:
    """Merge every PetalLinear of ``model`` at a fixed α; returns how many were merged."""
    layers = petal_layers(model)
    for _, layer in layers:
        layer.merge_(alpha)
    return len(layers)


def merge_and_unload(model: nn.Module, alpha: float | None = None) -> nn.Module:
    """Fold every PetalLinear of ``model`` at a fixed α into a plain ``nn.Linear`` (PEFT's
    ``merge_and_unload``): W ← W + s·((1 − α) B_lr A_lr + α B_hr A_hr), one-branch layers W + s·B A. The
    model is changed in place and returned; its state dict then loads into the plain backbone
    (``load_state_dict``, ``weights_only=True``). ``alpha`` may be omitted when every layer has one branch."""
    layers = petal_layers(model)
    if any(layer.branches == 2 and not layer.merged for _, layer in layers) and alpha is None:
        raise ValueError("merge_and_unload: two-branch PetalLinear layers need a fixed alpha in [0, 1]")
    for name, layer in layers:
        linear = layer.to_linear(alpha if layer.branches == 2 else None)
        linear.train(layer.training)
        if not name:
            return linear
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return model


def unmerge_petal(model: nn.Module) -> int:
    layers = [m for _, m in petal_layers(model) if m.merged]
    for layer in layers:
        layer.unmerge_()
    return len(layers)
