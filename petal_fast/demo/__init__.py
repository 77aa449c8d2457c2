"""The main job: PETALface's mechanism on synthetic faces, against full fine-tuning and LoRA.

    petal-fast demo [--preset tiny|cpu|gpu|gpu-small] [--output demo_output] [--seed 0]

1. synthesise faces of disjoint identities for pretraining, adaptation, evaluation and distractors
   (no downloads); the adaptation set mixes qualities as TinyFace / BRIAR do: per identity a few
   higher-quality and many low-quality images, whose BRISQUE scores spread α over [0, 1];
2. pretrain a small face Swin on high-resolution faces, once;
3. adapt it with full fine-tuning, LoRA (one branch, rank 2r), PETALface (two branches, rank r each:
   the same total rank) and PETALface with α fixed at 0.5 (does the quality weighting itself help?),
   each with several seeds;
4. evaluate every model: high-resolution verification (retention), cross-quality identification
   (higher-quality gallery with distractors, low-quality probes, rank-1/5), mixed-quality
   verification, and rank-1 per probe α bin;
5. write ``results.json``, ``results.md`` (mean ± std), the plots and ``demo.log`` (one line per stage).
"""
from __future__ import annotations

import argparse
from typing import Sequence

from .presets import METHODS, PRESETS, DemoPreset
from .run import run_demo

__all__ = ["METHODS", "PRESETS", "DemoPreset", "main", "run_demo"]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="petal-fast demo", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS),
                    help="size of the run: tiny (CI smoke), cpu (default, ≤ 15 min on 2 cores), gpu, gpu-small")
    ap.add_argument("--output", default="demo_output", help="folder for results.json, results.md, plots, demo.log")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0, help="data, pretraining and evaluation seed; run k adds k")
    args = ap.parse_args(argv)
    run_demo(args.preset, args.output, args.device, args.seed)
    return 0
