"""The PETALface training entry point (single process or ``torchrun --nproc_per_node=N``).

    petal-fast train --config configs/petalface.toml [key=value ...]
    python -m petal_fast.train --config ...
    torchrun --nproc_per_node=2 -m petal_fast.train --config ... sharded_head=true

Modes: ``pretrain`` (backbone from scratch), ``petalface`` (quality-weighted two-branch adapters),
``lora`` (single-branch adapters), ``full_ft`` (full fine-tuning). Per step: images → (quality → α)
→ model → margin loss → backward → clip → AdamW; a non-finite loss or gradient skips the step.
Checkpoints are atomic and hold the trainable weights, optimizer, scheduler, RNG states, data
position, α calibration and config; a resumed run reproduces an uninterrupted one.

The run itself is :class:`petal_fast.training.trainer.Trainer` (its parts are listed in
``petal_fast.training``); this module is the command line, :func:`train` and :func:`load_trained`,
and keeps the names callers import from here.
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from petal_fast.config import TrainConfig, load_config
from petal_fast.training.data import (StepBatches, build_dataset, dataset_labels, dataset_num_classes,
                                      prepare_images, resolve_num_classes)
from petal_fast.training.model import build_training_model, image_size_of, preset_image_size, set_train_mode
from petal_fast.training.optim import warmup_linear
from petal_fast.training.result import TrainResult
from petal_fast.training.same_run import RESUME_FREE, check_same_run, config_differences
from petal_fast.training.trainer import Trainer

__all__ = ["RESUME_FREE", "StepBatches", "Trainer", "TrainResult", "build_dataset", "build_training_model",
           "check_same_run", "config_differences", "dataset_labels", "dataset_num_classes", "image_size_of",
           "load_trained", "main", "prepare_images", "preset_image_size", "resolve_num_classes", "set_train_mode",
           "train", "trained_inputs", "warmup_linear"]


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu", partial: bool = False) -> nn.Module:
    """Rebuild a trained model from its run directory: config + pretrained backbone + ``model.pt``.

    ``model.pt`` must hold exactly what ``petal-fast train`` saves for this config (the trainable part
    in the adapter modes, every tensor otherwise), each with the model's shape: missing, unexpected and
    mismatched tensors are a :class:`~petal_fast.models.CheckpointError` listing them, unless ``partial``
    (``--partial-load``), which loads what fits and warns."""
    from petal_fast.models import CheckpointError, full_state_dict, safe_load, trainable_state_dict
    run_dir = Path(run_dir)
    path = run_dir / "model.pt" if run_dir.is_dir() else run_dir
    raw = safe_load(path)
    meta = raw.get("metadata", {}) if isinstance(raw, dict) else {}
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) \
            or not isinstance(raw.get("state_dict"), dict):
        raise ValueError(f"{path} has no training config and state dict: was it written by petal-fast train?")
    try:
        cfg = load_config(None, **meta["config"])
    except ValueError as err:
        raise ValueError(f"{path}: the saved training config is not valid here: {err}") from None
    head = {k: v for k, v in raw["state_dict"].items() if k == "head.weight"}
    num_classes = int(head["head.weight"].shape[0]) if head else None
    model = build_training_model(cfg, num_classes, torch.device(device))
    saved = {k: v for k, v in raw["state_dict"].items() if isinstance(v, torch.Tensor)}
    own = model.state_dict()
    expected = (trainable_state_dict if cfg.trains_adapters else full_state_dict)(model)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    mismatched = sorted(f"{k}: model {tuple(own[k].shape)} vs file {tuple(v.shape)}" for k, v in saved.items()
                        if k in own and own[k].shape != v.shape)
    if missing or unexpected or mismatched:
        listed = "; ".join(f"{name} {len(keys)}: {', '.join(keys[:10])}{' …' if len(keys) > 10 else ''}"
                           for name, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("mismatched", mismatched)) if keys)
        message = f"{path} does not fit the model its config describes ({listed})"
        if not partial:
            raise CheckpointError(f"{message}. Pass --partial-load (load_trained(partial=True)) to load only the "
                                  "tensors that fit")
        warnings.warn(message + "; loading the tensors that fit", RuntimeWarning, stacklevel=2)
    bad = {m.split(":")[0] for m in mismatched}
    model.load_state_dict({k: v for k, v in saved.items() if k in own and k not in bad}, strict=False)
    return model.eval()


def trained_inputs(run_dir: str | Path) -> dict[str, list[Path]]:
    """The files :func:`load_trained` reads for a run (its ``model.pt`` and pretrained checkpoint) and the
    run's other files, for commands that must not write over them (``eval``, ``export``)."""
    from petal_fast.io_guard import run_files
    run_dir = Path(run_dir)
    path = run_dir / "model.pt" if run_dir.is_dir() else run_dir
    inputs = {"the trained model": [path], "a file of the trained run": run_files(path.parent)}
    try:  # the metadata only: mmap leaves the tensors on disk
        meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("metadata", {})
        pretrained = meta.get("config", {}).get("pretrained")
    except Exception:  # noqa: BLE001 - unreadable files are load_trained's to report
        pretrained = None
    if isinstance(pretrained, str):
        inputs["the run's pretrained checkpoint"] = [Path(pretrained)]
    return inputs


def train(cfg: TrainConfig, model: nn.Module | None = None, dataset=None) -> tuple[Trainer, TrainResult]:
    trainer = Trainer(cfg, model=model, dataset=dataset)
    return trainer, trainer.fit()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="petal-fast train", description="Train PETALface (or a baseline).")
    ap.add_argument("--config", help="TOML or JSON config file (see configs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=1e-3 mode=lora data.path=x.rec")
    args = ap.parse_args(argv)
    from petal_fast.user_errors import report_errors
    return report_errors("petal-fast train", _run, args)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    trainer, result = train(cfg)
    if trainer.rank == 0:
        print("\nTraining summary")
        print(result.summary())
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
