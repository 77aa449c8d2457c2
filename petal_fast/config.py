"""Training configuration: a dataclass, read from TOML/JSON files, overridden by ``key=value`` words.

    petal-fast train --config configs/petalface.toml lr=1e-3 mode=lora data.path=/data/tinyface/train.rec

Defaults are the paper's PETALface recipe (AdamW, lr 5e-4, weight decay 0.1, linear warm-up then
linear decay per step, gradient clipping at norm 5, rank 8, CosFace s = 64, m = 0.4).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

MODES = ("pretrain", "petalface", "lora", "full_ft")
LOSSES = ("cosface", "arcface", "combined", "adaface")
QUALITIES = ("brisque", "resolution", "feature_norm")


class ConfigError(ValueError):
    """A config value of the wrong type or range, an unknown key or an unreadable config file;
    the message names the key (or file), what was expected and what was given."""


@dataclass
class DataConfig:
    kind: str = "synthetic"              # synthetic | recordio | imagefolder
    path: str | None = None              # train.rec (its .idx beside it) or the ImageFolder root
    num_identities: int = 200            # synthetic only
    images_per_identity: int = 20
    identity_offset: int = 0
    seed: int = 0
    size: int | None = None              # synthetic render size; default: the model's input size
    degrade: bool = True                 # low-resolution degradation (12–32 px) before the model
    resolution: tuple[int, int] = (12, 32)
    num_workers: int = 0


ADAPTER_MODES = ("lora", "petalface")  # modes that train adapters on a frozen backbone


@dataclass
class TrainConfig:
    mode: str = "petalface"
    backbone: str = "petalface"          # preset: petalface | small | tiny | vit_t | vit_s | vit_b | vit_tiny
    backbone_overrides: dict = field(default_factory=dict)
    pretrained: str | None = None        # backbone (or full model) checkpoint to start from
    pretrained_partial: bool = False     # load only the tensors of `pretrained` that fit (default: all must)
    num_classes: int | None = None       # margin-head classes; default: from the data (RecordIO header, labels)
    paper_compat: bool = False           # released Swin quirk: SW-MSA mask built but not applied
    data: DataConfig = field(default_factory=DataConfig)
    # optimisation (per-process batch; the global batch is batch_size × world size)
    batch_size: int = 64
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup: float = 0.1                  # fraction of the total steps (or an int number of steps if > 1)
    grad_clip: float = 5.0
    amp: str = "auto"                    # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | off
    compile: bool = False                # torch.compile(fullgraph=True) the forward + margin loss (backward too)
    cuda_graphs: bool = False            # compile as above with mode="reduce-overhead": CUDA-graph replay (CUDA only)
    # adapters
    rank: int = 8                        # per branch in petalface (two branches: 2 × rank in all)
    feature_rank: int | None = None      # rank of the feature Linear's single-branch LoRA; default: rank
    scale: float = 1.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("attn.qkv",)
    feature_lora: bool = True
    quality: str = "brisque"
    alpha_mode: str = "oriented"
    fixed_alpha: float | None = None     # petalface: this α for every image instead of the quality measure (ablation)
    calibrate_batches: int = 8           # training batches whose median quality becomes τ
    backbone_train_mode: bool = False    # adapter modes: run the frozen backbone's BN/dropout in train mode
    # loss
    loss: str = "cosface"
    margin: float | None = None          # CosFace m3 / ArcFace m2 / AdaFace m; default per loss
    margins: tuple[float, float, float] | None = None   # (m1, m2, m3) for loss = combined
    loss_scale: float = 64.0
    grad: str = "exact"                  # exact | straight_through
    sharded_head: bool = False           # class-sharded margin head over the ranks (Partial FC)
    sample_rate: float = 1.0
    # run
    output: str = "runs/petalface"
    save_every: int = 0                  # steps between checkpoints; 0 = at the end of every epoch
    resume: bool = True                  # continue from <output>/checkpoint_last.pt if it exists
    seed: int = 0
    log_every: int = 10
    device: str = "auto"
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Check every value's type (ints where ints are meant, …) and range; raise :class:`ConfigError`
        naming the key, what it expects and what it got. Returns ``self`` (ints given for floats are
        converted, lists for tuples)."""
        _check_types(self, "")
        _check_types(self.data, "data.")
        choices = {"mode": MODES, "loss": LOSSES, "amp": ("auto", "bf16", "fp16", "off"), "quality": QUALITIES,
                   "alpha_mode": ("oriented", "paper"), "grad": ("exact", "straight_through"),
                   "data.kind": ("synthetic", "recordio", "imagefolder")}
        for key, allowed in choices.items():
            if _get(self, key) not in allowed:
                raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {_get(self, key)!r}")
        at_least = {"batch_size": 1, "epochs": 1, "max_steps": 1, "rank": 1, "feature_rank": 1, "calibrate_batches": 1, "log_every": 1,
                    "save_every": 0, "num_classes": 2, "data.num_identities": 1, "data.images_per_identity": 1,
                    "data.identity_offset": 0, "data.size": 16, "data.num_workers": 0}
        for key, low in at_least.items():
            value = _get(self, key)
            if value is not None and value < low:
                raise ConfigError(f"{key} must be an integer >= {low}; got {value!r}")
        ranges = {"lr": (0, math.inf, False), "weight_decay": (0, math.inf, True), "warmup": (0, math.inf, True),
                  "grad_clip": (0, math.inf, False), "scale": (-math.inf, math.inf, False),
                  "dropout": (0, 1, True), "loss_scale": (0, math.inf, False), "sample_rate": (0, 1, False),
                  "margin": (-math.inf, math.inf, False)}
        for key, (lo, hi, lo_ok) in ranges.items():
            value = _get(self, key)
            if value is None:
                continue
            if not (math.isfinite(value) and (value >= lo if lo_ok else value > lo) and value <= hi
                    and (key != "dropout" or value < 1)):
                what = {"dropout": "in [0, 1)", "sample_rate": "in (0, 1]", "scale": "finite", "margin": "finite",
                        "weight_decay": ">= 0", "warmup": ">= 0"}.get(key, "> 0")
                raise ConfigError(f"{key} must be a finite number {what}; got {value!r}")
        if self.fixed_alpha is not None:
            if not (math.isfinite(self.fixed_alpha) and 0.0 <= self.fixed_alpha <= 1.0):
                raise ConfigError(f"fixed_alpha must be a number in [0, 1] (or unset); got {self.fixed_alpha!r}")
            if self.mode != "petalface":
                raise ConfigError(f"fixed_alpha weights PETALface's two branches: it needs mode=petalface, not "
                                  f"mode={self.mode!r}")
        if self.warmup > 1 and self.warmup != int(self.warmup):
            raise ConfigError(f"warmup must be a fraction of the steps (<= 1) or a whole number of steps; got {self.warmup!r}")
        if self.margins is not None and not all(math.isfinite(m) for m in self.margins):
            raise ConfigError(f"margins must be three finite numbers (m1, m2, m3); got {self.margins!r}")
        lo, hi = self.data.resolution
        if not 1 <= lo <= hi:
            raise ConfigError("data.resolution must be (low, high) pixels with 1 <= low <= high; "
                              f"got {self.data.resolution!r}")
        self._check_backbone()
        if not self.targets or not all(self.targets):
            raise ConfigError(f"targets must name at least one layer (e.g. ['attn.qkv']); got {self.targets!r}")
        if self.device != "auto":
            try:
                import torch
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}") from None
        if not self.output:
            raise ConfigError("output must name a directory for checkpoints and logs; got an empty string")
        if self.data.kind != "synthetic" and not self.data.path:
            raise ConfigError(f"data.kind={self.data.kind!r} needs data.path (the .rec file or the ImageFolder root)")
        if self.mode == "full_ft" and not self.pretrained:
            raise ConfigError("mode=full_ft fine-tunes a pretrained backbone: set pretrained=<checkpoint>")
        if self.loss == "combined" and self.margins is None:
            raise ConfigError("loss=combined needs margins=[m1, m2, m3]")
        if self.cuda_graphs and self.device == "cpu":
            raise ConfigError("cuda_graphs=true replays CUDA graphs: it needs device=cuda (or auto on a GPU machine)")
        return self

    def _check_backbone(self) -> None:
        from petal_fast.models.presets import SWIN_PRESETS, VIT_PRESETS
        table = VIT_PRESETS if self.backbone.startswith("vit") else SWIN_PRESETS
        key = self.backbone if self.backbone in table else self.backbone.split("_", 1)[-1]
        if key not in table:
            names = sorted(SWIN_PRESETS) + sorted(f"vit_{k}" if not k.startswith("vit") else k for k in VIT_PRESETS)
            raise ConfigError(f"backbone must be one of {', '.join(names)}; got {self.backbone!r}")
        for name, value in self.backbone_overrides.items():
            if name not in table[key]:
                raise ConfigError(f"backbone_overrides.{name} is not a field of the {self.backbone!r} backbone; "
                                  f"known: {', '.join(table[key])}")
            default = table[key][name]
            hint = tuple[int, ...] if isinstance(default, tuple) else type(default)
            ok, converted = _conform(value, hint)
            if not ok:
                raise ConfigError(f"backbone_overrides.{name} must be {_type_name(hint)} like {default!r}; got {value!r}")
            # sizes of zero are meaningless (and divide by zero); rates are fractions
            if isinstance(converted, float) and not (math.isfinite(converted) and 0 <= converted < 1):
                raise ConfigError(f"backbone_overrides.{name} must be a number in [0, 1) like {default!r}; "
                                  f"got {value!r}")
            if (isinstance(converted, int) and converted < 1) or \
                    (isinstance(converted, tuple) and not (converted and all(v >= 1 for v in converted))):
                what = "an integer >= 1" if isinstance(converted, int) else "a list of integers >= 1"
                raise ConfigError(f"backbone_overrides.{name} must be {what} like {default!r}; got {value!r}")
            self.backbone_overrides[name] = converted

    def margin_args(self) -> tuple[str, tuple[float, ...] | None]:
        """(loss name, margins) for MarginSoftmaxLoss from ``loss``/``margin``/``margins``."""
        if self.loss == "combined":
            if self.margins is None:
                raise ValueError("loss=combined needs margins=(m1, m2, m3)")
            return "combined", tuple(self.margins)
        if self.margin is None:
            return self.loss, None
        return {"cosface": ("combined", (1.0, 0.0, self.margin)), "arcface": ("combined", (1.0, self.margin, 0.0)),
                "adaface": ("adaface", (self.margin,))}[self.loss]

    @property
    def trains_adapters(self) -> bool:
        """True in the adapter modes (``lora``, ``petalface``): the backbone stays frozen, only the
        adapters and the head train, and checkpoints hold just that trainable part."""
        return self.mode in ADAPTER_MODES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {plural.get(args[0], _type_name(args[0]))}"
        if len(set(args)) == 1 and args[0] in plural:
            return f"a list of {len(args)} {plural[args[0]]}"
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict or hint is dict:
        return "a table (dict)"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(hint, str(hint))


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(fits, value converted to the field's type): int → float, list → tuple, element-wise for tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if _is_union(hint):
        for a in args:
            if a is type(None):
                if value is None:
                    return True, None
                continue
            ok, v = _conform(value, a)
            if ok:
                return True, v
        return False, value
    if origin is tuple:
        if isinstance(value, str) and len(args) == 2 and args[1] is Ellipsis and args[0] is str:
            value = (value,)  # targets=attn.qkv: one name
        if not isinstance(value, (list, tuple)):
            return False, value
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        out = [_conform(v, a) for v, a in zip(value, items)]
        return all(ok for ok, _ in out), tuple(v for _, v in out)
    if hint is dict or origin is dict:
        return isinstance(value, dict), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if hint is str:
        return isinstance(value, str), value
    return True, value


def _check_types(cfg: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        hint, value = hints[f.name], getattr(cfg, f.name)
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"{prefix}{f.name} must be a table of {hint.__name__} keys; got {value!r}")
            continue
        ok, converted = _conform(value, hint)
        if not ok:
            raise ConfigError(f"{prefix}{f.name} must be {_type_name(hint)}; got {value!r} ({type(value).__name__})")
        setattr(cfg, f.name, converted)


def _apply(cfg: Any, key: str, value: Any, full: str | None = None, raw: str | None = None) -> None:
    """Set ``key`` (dotted for nested tables) to ``value``; ``raw`` is the command-line text, kept as is
    for string fields (``output=2024`` names a folder, not the number 2024)."""
    full = full or key
    head, _, rest = key.partition(".")
    if not dataclasses.is_dataclass(cfg) or head not in {f.name for f in dataclasses.fields(cfg)}:
        if dataclasses.is_dataclass(cfg):
            names = [f.name for f in dataclasses.fields(cfg)]
            raise ConfigError(f"unknown config key {full!r}; known keys here: {', '.join(names)}")
        raise ConfigError(f"unknown config key {full!r}: {full[:len(full) - len(key) - 1]!r} has no sub-keys")
    current = getattr(cfg, head)
    if rest:
        if isinstance(current, dict):
            current[rest] = value
        else:
            _apply(current, rest, value, full, raw)
    elif dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            keys = ", ".join(f.name for f in dataclasses.fields(current))
            raise ConfigError(f"config key {full!r} is a table of keys ({keys}); "
                              f"got {value!r}: set {full}.<key>=value instead")
        for k, v in value.items():
            _apply(current, str(k), v, f"{full}.{k}")
    else:
        hint = typing.get_type_hints(type(cfg))[head]
        if raw is not None and value is not None and not isinstance(value, str) \
                and (hint is str or (_is_union(hint) and str in typing.get_args(hint))):
            value = raw
        setattr(cfg, head, value)


def parse_value(text: str) -> Any:
    """``5e-4`` → float, ``[12, 32]`` → list, ``true``/``none`` → bool/None, anything else a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # not a literal: the text itself
        return text


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML or JSON config file → dict; errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(text)
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise ConfigError(f"config file {path} is not valid {kind}: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of keys at the top level; got {type(values).__name__}")
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), **kwargs: Any) -> TrainConfig:
    """Defaults ← file (TOML or JSON) ← ``overrides`` (``key=value``, dotted keys for ``data.*``) ← kwargs.

    Raises :class:`ConfigError` (a ValueError) for unknown keys and values of the wrong type or range.
    """
    cfg = TrainConfig()
    if path is not None:
        for k, v in read_config_file(path).items():
            _apply(cfg, str(k), v)
    for word in overrides:
        key, eq, text = word.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"override {word!r} must look like key=value (e.g. lr=1e-3 or data.path=train.rec)")
        _apply(cfg, key.strip(), parse_value(text), raw=text)
    for k, v in kwargs.items():
        _apply(cfg, k, v)
    return cfg.validate()
