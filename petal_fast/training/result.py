"""What a training run reports: steps, throughput, losses, trainable share, output folder."""
from __future__ import annotations

from dataclasses import dataclass, field


class TrainingFailed(RuntimeError):
    """The run could not train: no optimisation step applied, or the weights diverged (non-finite).
    The message names the step and learning rate; the last finite checkpoint is kept. ``petal-fast
    train`` prints it and exits with status 1."""


@dataclass
class TrainResult:
    steps: int = 0
    skipped: int = 0
    images: int = 0
    seconds: float = 0.0
    # the first step of this run: torch.compile, first kernel calls and allocations (not throughput)
    warmup_seconds: float = 0.0
    warmup_images: int = 0
    final_loss: float = float("nan")
    losses: list[float] = field(default_factory=list)
    output: str = ""
    trainable: int = 0
    total: int = 0

    @property
    def images_per_second(self) -> float:
        """Throughput after the first step (all steps when there is only one): with ``compile = true``
        the first step holds the compilation, tens of seconds that are not the training speed."""
        images, seconds = self.images - self.warmup_images, self.seconds - self.warmup_seconds
        if images <= 0 or seconds <= 0:
            images, seconds = self.images, self.seconds
        return images / seconds if seconds > 0 else 0.0

    def to_summary(self) -> dict:
        """The ``summary.json`` record (every field but the per-step losses)."""
        return {k: v for k, v in vars(self).items() if k != "losses"} | {"images_per_second": self.images_per_second}

    def summary(self) -> str:
        final = f"{self.final_loss:.4f}" if self.losses else "— (no step run: the run in output was already complete)"
        rows = [("steps", f"{self.steps}"), ("skipped (non-finite)", f"{self.skipped}"),
                ("images", f"{self.images}"), ("time", f"{self.seconds:.1f} s (first step {self.warmup_seconds:.1f} s)"),
                ("throughput", f"{self.images_per_second:.1f} img/s (after the first step)"), ("final loss", final),
                ("trainable", f"{self.trainable:,} of {self.total:,} ({100 * self.trainable / max(1, self.total):.3f}%)"),
                ("output", self.output)]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
