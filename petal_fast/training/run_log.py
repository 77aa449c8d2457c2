"""What a run reports while it trains: ``log.jsonl``, TensorBoard (if installed) and a progress bar.

Only rank 0 writes. A fresh start replaces the log of an earlier attempt; a resumed run appends.
A non-finite loss is written as the string ``"nan"`` / ``"inf"`` (strict JSON has no such numbers).
"""
from __future__ import annotations

from pathlib import Path

from petal_fast.jsonio import dumps


class RunLog:
    def __init__(self, output: Path, total: int, initial: int, fresh: bool, progress: bool, writes: bool):
        self.file = open(output / "log.jsonl", "w" if fresh else "a") if writes else None
        self.writer = _tensorboard(output) if writes else None
        self.bar = _progress(total=total, initial=initial, enabled=progress and writes)

    def record(self, step: int, epoch: int, loss: float, lr: float, applied: bool, skipped: int,
               images_per_s: float) -> None:
        if self.file is None:
            return
        rec = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "applied": applied, "skipped": skipped,
               "images_per_s": images_per_s}
        self.file.write(dumps(rec) + "\n")
        self.file.flush()
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)

    def tick(self, loss: float, images_per_s: float, skipped: int) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images_per_s:.0f}", skipped=skipped)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def _progress(total: int, initial: int, enabled: bool):
    from petal_fast.progress import progress
    return progress(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: the JSON-lines log is always written
        return None
    return SummaryWriter(str(output / "tb"))
