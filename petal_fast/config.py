"""Training configuration: a dataclass, read from TOML/JSON files, overridden by ``key=value`` words.

    petal-fast train --config configs/petalface.toml lr=1e-3 mode=lora data.path=/data/tinyface/train.rec

Defaults are the paper's PETALface recipe (AdamW, lr 5e-4, weight decay 0.1, linear warm-up then
linear decay per step, gradient clipping at norm 5, rank 8, CosFace s = 64, m = 0.4).
"""
from __future__ import annotations

import ast
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

MODES = ("pretrain", "petalface", "lora", "full_ft")
LOSSES = ("cosface", "arcface", "combined", "adaface")


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


@dataclass
class TrainConfig:
    mode: str = "petalface"
    backbone: str = "petalface"          # preset: petalface | small | tiny | vit_t | vit_s | vit_b | vit_tiny
    backbone_overrides: dict = field(default_factory=dict)
    pretrained: str | None = None        # backbone (or full model) checkpoint to start from
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
    # adapters
    rank: int = 8
    scale: float = 1.0
    dropout: float = 0.1
    targets: tuple[str, ...] = ("attn.qkv",)
    feature_lora: bool = True
    quality: str = "brisque"
    alpha_mode: str = "oriented"
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
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.data.kind not in ("synthetic", "recordio", "imagefolder"):
            raise ValueError(f"data.kind must be synthetic, recordio or imagefolder, got {self.data.kind!r}")
        if self.data.kind != "synthetic" and not self.data.path:
            raise ValueError(f"data.kind={self.data.kind!r} needs data.path")
        if self.mode == "full_ft" and not self.pretrained:
            raise ValueError("mode=full_ft fine-tunes a pretrained backbone: set pretrained=<checkpoint>")
        for name in ("batch_size", "epochs", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        return self

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, current: Any) -> Any:
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _apply(cfg: Any, key: str, value: Any) -> None:
    head, _, rest = key.partition(".")
    if not hasattr(cfg, head):
        names = [f.name for f in dataclasses.fields(cfg)]
        raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(names)}")
    if rest:
        sub = getattr(cfg, head)
        if isinstance(sub, dict):
            sub[rest] = value
        else:
            _apply(sub, rest, value)
    elif dataclasses.is_dataclass(getattr(cfg, head)) and isinstance(value, dict):
        for k, v in value.items():
            _apply(getattr(cfg, head), k, v)
    else:
        setattr(cfg, head, _coerce(value, getattr(cfg, head)))


def parse_value(text: str) -> Any:
    """``5e-4`` → float, ``[12, 32]`` → list, ``true``/``none`` → bool/None, anything else a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), **kwargs: Any) -> TrainConfig:
    """Defaults ← file (TOML or JSON) ← ``overrides`` (``key=value``, dotted keys for ``data.*``) ← kwargs."""
    cfg = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file not found: {path}")
        if path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            values = tomllib.loads(path.read_text())
        for k, v in values.items():
            _apply(cfg, k, v)
    for word in overrides:
        key, eq, text = word.partition("=")
        if not eq:
            raise ValueError(f"override {word!r} must look like key=value")
        _apply(cfg, key.strip(), parse_value(text))
    for k, v in kwargs.items():
        _apply(cfg, k, v)
    return cfg.validate()
