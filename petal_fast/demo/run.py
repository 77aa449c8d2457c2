"""The demo's pipeline: data → α → pretraining → 4 methods × seeds → evaluation → report."""
from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from petal_fast.config import DataConfig, TrainConfig

from . import data as demo_data
from .evaluate import Evaluator
from .presets import METHODS, PRESETS, DemoPreset, method_overrides
from .quality import brisque_scores, reference_alpha, spread

LOG_NAME = "demo.log"


class StageLog:
    """One line per finished stage, on stdout and in ``<output>/demo.log``: ``[demo k/N mm:ss] what``."""

    def __init__(self, path: Path, stages: int, echo: bool = True):
        self.path, self.stages, self.echo, self.done = path, stages, echo, 0
        self.t0 = time.perf_counter()
        path.write_text("")

    def __call__(self, what: str) -> None:
        self.done += 1
        s = time.perf_counter() - self.t0
        line = f"[demo {self.done}/{self.stages} {int(s // 60):02d}:{s % 60:04.1f}] {what}"
        with self.path.open("a") as f:
            f.write(line + "\n")
        if self.echo:
            print(line, flush=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def run_demo(preset: str = "cpu", output: str | Path = "demo_output", device: str = "auto", seed: int = 0,
             methods: Sequence[str] = METHODS, progress: bool = True) -> dict:
    """Run the demo and write ``results.json``, ``results.md``, the plots and ``demo.log`` to ``output``.

    ``seed`` fixes the data, pretraining and evaluation; adaptation run k of each method uses
    ``seed + k``. The same preset, seed and device give the same results (timings aside).
    """
    from petal_fast.models import full_state_dict
    from petal_fast.train import Trainer, preset_image_size

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods must be among {METHODS}, got {unknown}")
    p = PRESETS[preset]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]  # timings are only comparable at the same load
    log = StageLog(out / LOG_NAME, 5 + len(methods) * p.seeds, echo=progress)
    base = TrainConfig(backbone=p.backbone, batch_size=p.batch_size, seed=seed, device=device, progress=False,
                       resume=False, calibrate_batches=p.calibrate_batches, data=DataConfig(degrade=False))
    size = preset_image_size(base)

    pretrain_set = demo_data.faces(p.pretrain_identities, p.pretrain_images, size, demo_data.PRETRAIN_OFFSET, seed)
    adapt, levels = demo_data.adaptation_set(p.adapt_identities, p.adapt_hq, p.adapt_lq, size, seed)
    sets = demo_data.eval_sets(p.eval_identities, p.eval_probes, p.distractors, size, seed)
    log(f"preset {preset}: backbone {p.backbone} at {size} px; synthesised {len(pretrain_set)} pretraining, "
        f"{len(adapt)} adaptation ({p.adapt_hq} higher- + {p.adapt_lq} low-quality per identity) and "
        f"{len(sets.hr) + len(sets.gallery) + len(sets.lq_probes) + len(sets.mixed)} evaluation images")

    alpha, probe_alpha = _alpha_report(adapt.images, levels, sets)
    log(f"α of the adaptation set (τ = {alpha['tau_ref']:.1f}): mean {alpha['train']['mean']:.2f}, "
        f"std {alpha['train']['std']:.2f}, q10–q90 {alpha['train']['q10']:.2f}–{alpha['train']['q90']:.2f}; "
        f"higher-quality {alpha['train_hq']['mean']:.2f}, low-quality {alpha['train_lq']['mean']:.2f}")

    cfg = replace(base, mode="pretrain", epochs=p.pretrain_epochs, lr=p.pretrain_lr, weight_decay=0.05,
                  output=str(out / "pretrain"))
    trainer = Trainer(cfg, dataset=pretrain_set)
    res = trainer.fit()
    pretrained = out / "pretrain" / "backbone.pt"
    torch.save({k: v for k, v in full_state_dict(trainer.model).items() if k.startswith("backbone.")}, pretrained)
    dev = trainer.device
    log(f"pretrained on {len(pretrain_set)} high-resolution images of {p.pretrain_identities} identities: "
        f"{res.steps} steps, loss {res.final_loss:.3f}, {res.images_per_second:.0f} img/s")

    evaluate = Evaluator(sets, probe_alpha, p.pairs, seed, size, dev)
    total = sum(q.numel() for q in trainer.model.backbone.parameters())
    metrics = evaluate(trainer.model)
    runs = {"pretrained": [{"seed": seed, "trainable": 0, "total": total, "images_per_second": None, **metrics}]}
    log("evaluated the pretrained model: " + _brief(metrics))

    for method in methods:
        runs[method] = []
        for k in range(p.seeds):
            cfg = replace(base, epochs=p.adapt_epochs, pretrained=str(pretrained), dropout=0.1, seed=seed + k,
                          output=str(out / method / f"seed{k}"), **method_overrides(method, p))
            trainer = Trainer(cfg, dataset=adapt)
            res = trainer.fit()
            backbone = list(trainer.model.backbone.parameters())
            run = {"seed": seed + k, "trainable": sum(q.numel() for q in backbone if q.requires_grad),
                   "total": sum(q.numel() for q in backbone), "images_per_second": res.images_per_second,
                   "final_loss": res.final_loss, **evaluate(trainer.model)}
            measure = getattr(trainer.model, "quality_to_alpha", None)
            if hasattr(measure, "tau"):
                run["tau"] = float(measure.tau)
            runs[method].append(run)
            log(f"{method} seed {seed + k}: loss {res.final_loss:.3f}, {res.images_per_second:.0f} img/s; "
                + _brief(run))

    level_text = {"high": _level_text(demo_data.HIGH, size), "low": _level_text(demo_data.LOW, size)}
    results = {"_meta": {"preset": preset, "device": str(dev), "image_size": size, "seed": seed, "seeds": p.seeds,
                         "rank": p.rank, "threads": torch.get_num_threads(), "adapt_images": len(adapt),
                         "adapt_epochs": p.adapt_epochs, "levels": level_text, "seconds": log.seconds,
                         "load": [load_start, os.getloadavg()[0]]},
               "alpha": alpha, "runs": runs}
    from .report import write_outputs
    write_outputs(results, out, echo=progress)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and the plots; total {log.seconds / 60:.1f} min")
    return results


def _alpha_report(adapt_images: np.ndarray, levels: np.ndarray, sets) -> tuple[dict, np.ndarray]:
    """BRISQUE and reference α of the adaptation set (histogram, spread per level) and the eval probes' α."""
    q_train = brisque_scores(adapt_images)
    tau = float(np.median(q_train[np.isfinite(q_train)]))
    a_train = reference_alpha(q_train, tau)
    a_probe = reference_alpha(brisque_scores(sets.alpha_probes()[0]), tau)
    hist, edges = np.histogram(a_train, bins=20, range=(0.0, 1.0))
    hq, lq = levels == demo_data.HIGH, levels == demo_data.LOW
    return ({"tau_ref": tau, "brisque_train": spread(q_train), "train": spread(a_train),
             "train_hq": spread(a_train[hq]), "train_lq": spread(a_train[lq]),
             "hist": {"counts_hq": np.histogram(a_train[hq], bins=edges)[0].tolist(),
                      "counts_lq": np.histogram(a_train[lq], bins=edges)[0].tolist(), "edges": edges.tolist(),
                      "counts": hist.tolist()},
             "probes": spread(a_probe)}, a_probe)


def _level_text(level: int, size: int) -> str:
    d = demo_data.level_degrade(level, size)
    jpeg = "no JPEG" if d.jpeg_quality is None else f"JPEG q {d.jpeg_quality[0]}–{d.jpeg_quality[1]} " \
                                                     f"(p = {d.jpeg_prob:g})"
    return (f"{d.resolution[0]}–{d.resolution[1]} px, blur σ {d.blur_sigma[0]:g}–{d.blur_sigma[1]:g}, "
            f"noise {d.noise_std[0]:g}–{d.noise_std[1]:g}, {jpeg}")


def _brief(m: dict) -> str:
    pct = lambda v: "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"  # noqa: E731
    return (f"HR ver {pct(m['hr_ver'])}, cross-quality rank-1 {pct(m['xq_rank1'])}, "
            f"mixed ver {pct(m['mixed_ver'])}")
