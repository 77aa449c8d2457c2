"""Whether an output folder holds *this* run: a resume continues only a run with the same config."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from petal_fast.config import ConfigError, TrainConfig

# Keys that do not change what a run computes: a resumed run may differ from the saved one in these.
RESUME_FREE = ("output", "resume", "progress", "log_every", "save_every", "device", "data.num_workers")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "backbone_overrides":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


WORLD = "world size (processes)"  # not a config key, but it shapes the run: the global batch is batch × world


def config_differences(saved: dict, cfg: TrainConfig, saved_world: int = 1,
                       world: int = 1) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, current value)} for every key that changes the run, the number of processes
    included (keys the saved config lacks take their defaults: files written before a key existed ran
    with its default; a file without a world size was written by one process)."""
    old = _flatten(TrainConfig().to_dict()) | _flatten(saved)
    new = _flatten(cfg.to_dict())
    diff = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in RESUME_FREE and old.get(k) != new.get(k)}
    if saved_world != world:
        diff[WORLD] = (saved_world, world)
    return diff


def check_same_run(path: Path, saved: Any, cfg: TrainConfig, saved_world: Any = 1, world: int = 1) -> None:
    """Refuse to continue (or overwrite) the run saved at ``path`` unless its config and number of
    processes equal ``cfg`` and ``world``."""
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds no training config, so it cannot be told whether it belongs to this run: "
                         f"use a new output folder, or resume=false to start over in {path.parent} (overwrites it)")
    diff = config_differences(saved, cfg, saved_world if isinstance(saved_world, int) else 1, world)
    if diff:
        listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ConfigError(
            f"output folder {path.parent} holds a run with another config ({path.name}), differing in "
            f"{', '.join(diff)} ({listed}). Resuming would continue that run and ignore the new values. Either "
            f"choose a new output folder (output=<new folder>), or start over in this one with resume=false "
            f"(its checkpoint and model.pt are overwritten).")
