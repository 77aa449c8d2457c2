"""The training-state file: what a resumed run needs to continue exactly as an uninterrupted one.

``checkpoint_last.pt`` holds the trainable weights, optimizer, scheduler, step counters, data
position, RNG states of torch / NumPy / Python (and CUDA), the config and the world size. It is
written atomically (``petal_fast.atomic_files``) and read back with ``weights_only=True``; an
unreadable, truncated or foreign file raises :class:`CheckpointFileError` naming the file and the
problem. (A model's weights alone, e.g. ``model.pt``, are ``petal_fast.models.weights``.)
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

LAST = "checkpoint_last.pt"
REQUIRED = ("model", "optimizer", "scheduler", "step", "skipped", "epoch", "step_in_epoch", "rng")


class CheckpointFileError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint); names the file."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), None if gauss is None else float(gauss)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> tuple:  # as tensors and plain numbers: loadable with weights_only=True
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _python_state() -> tuple:
    version, internal, gauss = random.getstate()
    return (version, torch.tensor(internal, dtype=torch.int64), gauss)


def load(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain data only)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    if size == 0:
        raise CheckpointFileError(f"cannot read checkpoint {path}: the file is empty (0 bytes); delete it or "
                                  "start over with resume=false")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - name the file and the cause
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointFileError(f"cannot read checkpoint {path} ({size} bytes): {first}. The file is truncated, "
                                  "corrupt or not a torch checkpoint; delete it (or start over with resume=false) "
                                  "if it cannot be restored") from None
    if not isinstance(state, dict):
        raise CheckpointFileError(f"checkpoint {path} holds a {type(state).__name__}, not a training checkpoint dict")
    return state


def latest(output: str | Path) -> Path | None:
    path = Path(output) / LAST
    return path if path.exists() else None
