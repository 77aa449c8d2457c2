"""``Trainer``: one training run, composed of its parts.

    data (order, loader)  →  model  →  Distributed (DDP, sharded head)  →  optimizer + schedule
                                      ↘ Checkpointer (resume, save, export)   RunLog (log, progress)

Per step: images → (quality → α) → model → margin loss → backward → clip → AdamW; a non-finite
loss or gradient skips the step on every rank and leaves weights and BatchNorm statistics as they
were. ``fit`` = resume, loop, export.

``compile = true`` compiles forward + fused margin loss as one graph (``fullgraph=True``; AOTAutograd
compiles the backward with it). Clipping and the AdamW step stay eager: they run only when the loss
and the gradient norm are finite (a host-side decision per step), and in torch 2.13
``torch.compile(optimizer.step, fullgraph=True)`` does not trace in one graph (why: docs/notes.md).
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from torch import nn

from petal_fast.config import TrainConfig

from .checkpointer import Checkpointer, check_outputs
from .data import StepBatches, build_dataset, dataset_labels, make_loader, prepare_images, resolve_num_classes
from .distributed import Distributed, resolve_device
from .model import build_training_model, image_size_of, preset_image_size, set_train_mode
from .optim import build_optimizer, build_scheduler
from .resources import check_data_fits, check_model_fits
from .result import TrainingFailed, TrainResult
from .run_lock import RunLock
from .run_log import RunLog

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Owns model, optimizer, schedule, data order and checkpoints for one training run."""

    def __init__(self, cfg: TrainConfig, model: nn.Module | None = None, dataset=None):
        self.cfg = cfg.validate()
        check_outputs(cfg)  # before anything is read or written
        self.device = resolve_device(cfg.device)
        if cfg.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=true needs a CUDA device; this run is on {self.device}")
        self.dist = Distributed(self.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.image_size = image_size_of(model) if model is not None else preset_image_size(cfg)
        if dataset is None:
            self.dist.together(lambda: check_data_fits(cfg, self.image_size))
        self.dataset = dataset if dataset is not None else build_dataset(cfg, self.image_size)
        self.model = model if model is not None else self._build_model()
        self._check_head()
        self.dist.wrap(self.model, cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg)
        self.steps_per_epoch = StepBatches(len(self.dataset), cfg.batch_size, self.world, self.rank, cfg.seed,
                                           0).steps()
        if self.steps_per_epoch == 0:
            raise ValueError(f"the data set has {len(self.dataset)} images, fewer than one global batch of "
                             f"{cfg.batch_size * self.world}: lower batch_size")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg)
        self.step, self.skipped = 0, 0
        self.saved_step: int | None = None  # the step of the last checkpoint on disk (None: none yet)
        self.lr_used: float | None = None    # the learning rate of the last step (the schedule moved on since)
        self.checkpointer = Checkpointer(cfg, self.rank, self.world)
        self.output = self.checkpointer.output
        self.amp_dtype = _AMP.get(cfg.amp if cfg.amp != "auto" else ("bf16" if self.device.type == "cuda" else "off"))
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        set_train_mode(self.model, cfg)

    # -- the parts ------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world

    @property
    def ddp(self) -> nn.parallel.DistributedDataParallel | None:
        return self.dist.ddp

    @property
    def sharded(self) -> bool:
        return self.dist.sharded

    def _build_model(self) -> nn.Module:
        num_classes = resolve_num_classes(self.cfg, self.dataset)
        self.dist.together(lambda: check_model_fits(self.cfg, num_classes, self.image_size, self.device, self.world))
        torch.manual_seed(self.cfg.seed)  # the model's init must not depend on how the data was built
        return build_training_model(self.cfg, num_classes, self.device)

    def _check_head(self) -> None:
        head = getattr(self.model, "head", None)
        if head is None:
            raise ValueError("the model has no margin head to train: build it with num_classes")
        labels = dataset_labels(self.dataset)
        if labels is not None and labels.size and labels.max() >= head.num_classes:
            raise ValueError(f"the data has labels up to {int(labels.max())} but the margin head has "
                             f"{head.num_classes} classes: set num_classes or check the data set")

    def full_head_weight(self) -> torch.Tensor:
        """All class centres (C×D) of a sharded head, gathered from every rank (a collective)."""
        return self.dist.full_head_weight(self.model)

    def loader(self, epoch: int, start: int = 0) -> torch.utils.data.DataLoader:
        return make_loader(self.dataset, self.cfg, self.world, self.rank, epoch, start,
                           pin_memory=self.device.type == "cuda")

    def calibrate(self) -> None:
        """τ of the quality → α mapping from the median quality of the first training batches (none to
        calibrate with ``fixed_alpha``)."""
        if self.cfg.mode != "petalface" or self.cfg.fixed_alpha is not None \
                or not hasattr(self.model, "calibrate_quality"):
            return
        batches = []
        for i, (images, _labels) in enumerate(self.loader(0)):
            if i >= self.cfg.calibrate_batches:
                break
            batches.append(prepare_images(images, self.image_size, self.device))
        self.model.calibrate_quality(torch.cat(batches), progress=False)

    def save(self, epoch: int, step_in_epoch: int) -> None:
        """Checkpoint, only finite weights: a diverged run keeps its last finite checkpoint."""
        if not self.dist.all_true(torch.tensor(self._weights_finite())):
            raise self._diverged("an update made its weights non-finite (NaN or inf)")
        self.checkpointer.save(self.model, self.optimizer, self.scheduler, self.step, self.skipped, epoch,
                               step_in_epoch)
        self.saved_step = self.step
        self.dist.barrier()

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.params)

    def _diverged(self, what: str) -> TrainingFailed:
        lr = self.lr_used if self.lr_used is not None else self.scheduler.get_last_lr()[0]
        kept = (f"the last finite checkpoint (step {self.saved_step}) is kept in {self.output}"
                if self.saved_step is not None else "no checkpoint was written")
        return TrainingFailed(f"training diverged at step {self.step} (learning rate {lr:.3g}): {what}; {kept}. "
                              f"Lower lr (now {self.cfg.lr:g}) or grad_clip (now {self.cfg.grad_clip:g}) and start "
                              "over (resume=false, or a new output folder)")

    def resume(self) -> tuple[int, int]:
        """(epoch, step in epoch) to continue from: the saved run in ``output`` if ``resume`` and it
        is this run (same config), else (0, 0); a refusal comes before anything is loaded or written."""
        state = self.checkpointer.saved_state(self.model)
        if state is None:
            return 0, 0
        self.checkpointer.restore(state, self.model, self.optimizer, self.scheduler)
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        self.saved_step = self.step
        return int(state["epoch"]), int(state["step_in_epoch"])

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, bool]:
        """One optimisation step; returns (loss, applied). Non-finite loss/grad → skipped, nothing updated."""
        head = self.model.head
        # checked before the model runs (an error from the loss would come after BatchNorm moved its
        # statistics) and on the loader's CPU labels, before they move: no device sync
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= head.num_classes:
            raise ValueError(f"label out of range [0, {head.num_classes}): got {lo}…{hi}; no update was made. "
                             "The data set holds more classes than the head: set num_classes (or check the "
                             "data set's labels)")
        labels = labels.to(self.device)
        # BatchNorm statistics a skipped step must not keep (a NaN batch would poison them)
        stats = {n: b.detach().clone() for n, b in self.model.named_buffers()
                 if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        amp = self.amp_dtype is not None
        try:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=amp):
                loss = self.dist.loss(self.model, images, labels)
        except ValueError as err:  # "embeddings contain non-finite values": diverged weights or bad data
            if "non-finite" in str(err) and bool(torch.isfinite(images).all()):
                state = "non-finite" if not self._weights_finite() else "finite but so large that they overflow"
                raise self._diverged(f"the embeddings of finite images are NaN or inf (the weights are {state})") \
                    from err
            raise
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        norm = self.dist.clip_gradients(self.model, self.params, self.cfg.grad_clip)
        self.lr_used = self.optimizer.param_groups[0]["lr"]
        applied = self.dist.all_true(torch.isfinite(loss.detach()) & torch.isfinite(norm))
        if applied and self.scaler is not None:
            self.scaler.step(self.optimizer)
        elif applied:
            self.optimizer.step()
        else:
            self.skipped += 1
            buffers = dict(self.model.named_buffers())
            with torch.no_grad():
                for n, b in stats.items():
                    buffers[n].copy_(b)
        if self.scaler is not None:
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step calls the scheduler before the optimizer: intended
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step += 1
        return float(loss.detach()), applied

    # -- the run --------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> TrainResult:
        """Train to the configured end (or only until global step ``stop_after``, as if interrupted:
        the schedule still spans the whole run, so a later resume continues it exactly). The output
        folder is this run's alone meanwhile (:class:`~.run_lock.RunLock`, taken by rank 0)."""
        lock = RunLock(self.output) if self.rank == 0 else None
        self.dist.together(lambda: lock.acquire() if lock is not None else None)
        try:
            return self._fit(stop_after)
        finally:
            if lock is not None:
                lock.release()

    def _fit(self, stop_after: int | None) -> TrainResult:
        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        start_epoch, start_in_epoch = self.resume()  # first: a refused resume changes nothing
        self.checkpointer.prepare_folder()
        fresh = self.step == 0
        if fresh:
            self.calibrate()
        result = TrainResult(output=str(self.output), trainable=sum(p.numel() for p in self.params),
                             total=sum(p.numel() for p in self.model.parameters()))
        log = RunLog(self.output, self.total_steps, self.step, fresh, self.cfg.progress, writes=self.rank == 0)
        set_train_mode(self.model, self.cfg)
        t0 = time.perf_counter()
        try:
            self._loop(start_epoch, start_in_epoch, end, result, log, t0)
        finally:
            log.close()
        result.seconds = time.perf_counter() - t0
        result.steps, result.skipped = self.step, self.skipped
        result.final_loss = result.losses[-1] if result.losses else float("nan")
        self._export(result)
        return result

    def _loop(self, start_epoch: int, start_in_epoch: int, end: int, result: TrainResult, log: RunLog,
              t0: float) -> None:
        for epoch in range(start_epoch, math.ceil(self.total_steps / self.steps_per_epoch)):
            first = start_in_epoch if epoch == start_epoch else 0
            for i, (images, labels, *_rest) in enumerate(self.loader(epoch, first), start=first):
                if self.step >= end:
                    break
                images = prepare_images(images, self.image_size, self.device)
                loss, applied = self.train_step(images, labels)
                result.losses.append(loss)
                result.images += images.shape[0] * self.world
                if len(result.losses) == 1:
                    result.warmup_seconds, result.warmup_images = time.perf_counter() - t0, result.images
                done = i + 1 == self.steps_per_epoch
                if self._checkpoint_due(done):
                    self.save(epoch + 1 if done else epoch, 0 if done else i + 1)
                result.seconds = time.perf_counter() - t0
                speed = result.images_per_second
                if self.step % self.cfg.log_every == 0 or not applied:
                    log.record(self.step, epoch, loss, self.scheduler.get_last_lr()[0], applied, self.skipped, speed)
                log.tick(loss, speed, self.skipped)
            if self.step >= end:
                break

    def _checkpoint_due(self, epoch_done: bool) -> bool:
        """Every ``save_every`` steps (else at each epoch's end), and at the last step: a run ended by
        max_steps mid-epoch must be resumable too."""
        every = self.cfg.save_every
        return bool((every and self.step % every == 0) or (epoch_done and not every) or self.step == self.total_steps)

    def _export(self, result: TrainResult) -> None:
        """model.pt and summary.json once the run is complete; a rerun of a finished run trains
        nothing and leaves its model.pt as it is. A run that applied no step (every loss or gradient
        non-finite) writes no model.pt: it would be the initial weights, reported as trained."""
        finished = self.step >= self.total_steps
        if finished and result.losses and self.step == self.skipped:
            raise TrainingFailed(
                f"no optimisation step was applied: all {self.step} steps had a non-finite loss or gradient "
                f"(NaN or inf; learning rate {self.cfg.lr:g}, grad_clip {self.cfg.grad_clip:g}), so the weights are "
                "the initial ones and no model.pt was written. See log.jsonl; check the data (and pretrained=), "
                "or lower lr / loss_scale")
        if finished and not self.dist.all_true(torch.tensor(self._weights_finite())):
            raise self._diverged("its weights are non-finite (NaN or inf) at the end; no model.pt was written")
        full_head = self.full_head_weight() if self.sharded and finished else None  # a collective: every rank
        if self.rank == 0 and finished and (result.losses or not self.checkpointer.model_exported()):
            self.checkpointer.export(self.model, result, full_head)
