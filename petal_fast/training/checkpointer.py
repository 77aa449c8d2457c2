"""The one reader and writer of a run's output folder.

    checkpoint_last.pt        training state (``.rank<r>.pt`` per rank with a class-sharded head)
    model.pt                  the trained weights + the config, written by ``petal_fast.models.save_checkpoint``
    summary.json              the run's :class:`~petal_fast.training.result.TrainResult`

Every file is written atomically (``petal_fast.atomic_files``). Resuming continues only the run
the folder holds (same config, :mod:`.same_run`), and a checkpoint that fails half-way while
loading leaves model, optimizer, schedule and RNG as they were.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from petal_fast.atomic_files import atomic_save, atomic_write_text, clean_stale_tmp
from petal_fast.config import TrainConfig
from petal_fast.jsonio import dumps
from petal_fast.models import full_state_dict, safe_load, save_checkpoint, trainable_state_dict

from . import state as training_state
from .result import TrainResult
from .same_run import check_same_run

MODEL = "model.pt"
SUMMARY = "summary.json"


def check_outputs(cfg: TrainConfig) -> None:
    """Refuse an output folder whose files would overwrite the run's own inputs (the pretrained
    checkpoint, a data file) or that lies inside the ImageFolder being trained on."""
    from petal_fast.io_guard import check_outputs as check, data_inputs, run_files
    files, folders = data_inputs(cfg.data.path) if cfg.data.kind != "synthetic" else ([], [])
    output = Path(cfg.output)
    check("petal-fast train", [output, *run_files(output)],
          {"the pretrained checkpoint": [cfg.pretrained] if cfg.pretrained else [], "the training data": files},
          {"the training data (an ImageFolder root)": folders})


class Checkpointer:
    """Writes and restores the training state of one process, exports the finished model."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int):
        self.cfg, self.rank = cfg, rank
        self.output = Path(cfg.output)
        per_rank = world > 1 and cfg.sharded_head  # each rank owns other class centres
        self.path = self.output / (f"checkpoint_last.rank{rank}.pt" if per_rank else training_state.LAST)
        self.writes = per_rank or rank == 0
        self.world = world

    def prepare_folder(self) -> None:
        """Create the output folder and remove the temporary files of a process killed mid-write."""
        self.output.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp(self.output)

    def _weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state_dict(model) if self.cfg.trains_adapters else full_state_dict(model)

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, skipped: int,
             epoch: int, step_in_epoch: int) -> None:
        """This process's training state (every rank builds it: sharded heads differ per rank)."""
        state = {"model": self._weights(model), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "step": step, "skipped": skipped, "epoch": epoch,
                 "step_in_epoch": step_in_epoch, "rng": training_state.rng_state(), "config": self.cfg.to_dict(),
                 "world": self.world}
        if self.writes:
            atomic_save(state, self.path)

    def saved_state(self, model: nn.Module) -> dict[str, Any] | None:
        """The saved state of this run if ``resume`` and it exists, else None; refuses another run's
        folder (and a finished run's ``model.pt`` with another config) before anything is loaded."""
        if not self.cfg.resume:
            return None
        if not self.path.exists():
            # a run of another world size names its checkpoint otherwise (per rank with a sharded head)
            for other in (self.output / training_state.LAST, self.output / "checkpoint_last.rank0.pt"):
                if other != self.path and other.exists():
                    saved = training_state.load(other)
                    check_same_run(other, saved.get("config"), self.cfg, saved.get("world", 1), self.world)
            model_pt = self.output / MODEL
            if model_pt.exists():  # a finished run whose checkpoint is gone: do not overwrite it silently
                meta = safe_load(model_pt).get("metadata", {})
                meta = meta if isinstance(meta, dict) else {}
                check_same_run(model_pt, meta.get("config"), self.cfg, meta.get("world", 1), self.world)
            return None
        state = training_state.load(self.path)
        check_same_run(self.path, state.get("config"), self.cfg, state.get("world", 1), self.world)
        missing = [k for k in training_state.REQUIRED if k not in state]
        if missing:
            raise training_state.CheckpointFileError(f"checkpoint {self.path} lacks {', '.join(missing)}: it was not "
                                                     "written by petal-fast train; start over with resume=false")
        unknown = [k for k in state["model"] if k not in model.state_dict()]
        missing = [k for k in self._weights(model) if k not in state["model"]]  # would keep their initial values
        if unknown or missing:
            raise ValueError(f"{self.path} does not fit this model; " + "; ".join(
                f"{what} keys: {keys[:5]}" for what, keys in (("unknown", unknown), ("missing", missing)) if keys))
        return state

    def restore(self, state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: Any) -> None:
        """Load ``state`` into model, optimizer, schedule and RNG — all of it, or none of it."""
        backup = ({k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                   for k, v in model.state_dict().items()},
                  copy.deepcopy(optimizer.state_dict()), copy.deepcopy(scheduler.state_dict()),
                  training_state.rng_state())
        try:
            model.load_state_dict(state["model"], strict=False)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            training_state.set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
            model.load_state_dict(backup[0])
            optimizer.load_state_dict(backup[1])
            scheduler.load_state_dict(backup[2])
            training_state.set_rng_state(backup[3])
            raise training_state.CheckpointFileError(
                f"checkpoint {self.path} does not fit this run ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); "
                "start over with resume=false or use a new output folder") from None

    def model_exported(self) -> bool:
        return (self.output / MODEL).exists()

    def export(self, model: nn.Module, result: TrainResult, full_head: torch.Tensor | None = None) -> None:
        """``model.pt`` (the weights a checkpoint holds, plus the config) and ``summary.json``.
        ``full_head``: every class centre of a sharded head, so model.pt fits any world size."""
        save_checkpoint(model, self.output / MODEL, trainable_only=self.cfg.trains_adapters,
                        metadata={"config": self.cfg.to_dict(), "world": self.world},
                        replace={"head.weight": full_head} if full_head is not None else None)
        atomic_write_text(dumps(result.to_summary(), indent=2), self.output / SUMMARY)
