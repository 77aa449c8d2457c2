"""Command-line evaluation: argument definitions and the runner behind ``petal-fast eval``.

The console command builds the model from ``--checkpoint`` and calls ``run_eval(model_embed, args)``;
this module only needs the embedding function. Data sets (``--data``, repeatable):

- ``path/to/lfw.bin``: insightface verification pairs;
- a ``.rec`` file (or a folder holding ``train.rec``): insightface RecordIO, labelled;
- a folder of identity folders: ImageFolder, labelled;
- ``synthetic[:ids=N,per_id=K,size=S,seed=X,offset=O]``: the embedded synthetic faces.

Labelled sets are evaluated by identification (TinyFace-style gallery/probe split, optional
distractor set, optional open-set identities) and by verification on balanced sampled pairs.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
from PIL import Image

from ..data import Degrade, ImageFolderFaces, RecordIO, SyntheticFaces
from .bin_format import load_bin
from .plots import plot_cmc, plot_roc
from .protocols import EmbedFn, identification, make_pairs, split_gallery_probe, verification
from .report import markdown_table, save_report


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("evaluation")
    g.add_argument("--data", action="append", required=True,
                   help="a .bin pair file, a .rec (or folder with train.rec), an ImageFolder root, or "
                        "'synthetic[:ids=N,per_id=K,size=S,seed=X,offset=O]'; repeatable")
    g.add_argument("--protocol", choices=("auto", "verification", "identification", "both"), default="auto",
                   help="auto: verification for .bin, both for labelled sets")
    g.add_argument("--image-size", type=int, default=112, help="model input size (images are resized to it)")
    g.add_argument("--lowres", type=int, default=None,
                   help="degrade every image to this resolution (bicubic down, bicubic up) before embedding")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--no-flip", action="store_true", help="disable flip test-time augmentation")
    if "--device" not in parser._option_string_actions:  # the caller may already own --device (model placement)
        g.add_argument("--device", default=None, help="device for the input tensors (default: leave on CPU)")
    g.add_argument("--out", default="eval_out", help="folder for JSON, Markdown and PNG results")
    g.add_argument("--num-pairs", type=int, default=3000, help="sampled verification pairs for labelled sets")
    g.add_argument("--gallery-per-identity", type=int, default=1)
    g.add_argument("--open-set-fraction", type=float, default=0.0,
                   help="fraction of identities kept out of the gallery (adds TPIR@FPIR)")
    g.add_argument("--distractors", default=None, help="labelled data set whose images join the gallery as distractors")
    g.add_argument("--max-images", type=int, default=None, help="use at most this many images of a labelled set")
    g.add_argument("--seed", type=int, default=0, help="seed for pair sampling and gallery/probe splits")
    return parser


class _View:
    """Lazy, resized view of a labelled data set's images at given indices."""

    def __init__(self, ds, indices, size: int):
        self.ds, self.indices, self.size = ds, np.asarray(indices), size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        img = self.ds[int(self.indices[i])][0]
        if img.shape[:2] != (self.size, self.size):
            img = np.asarray(Image.fromarray(img).resize((self.size, self.size), Image.Resampling.BILINEAR))
        return img


def _labels(ds) -> np.ndarray:
    if hasattr(ds, "labels"):
        return np.asarray(ds.labels)
    if isinstance(ds, RecordIO):
        return ds.scan_labels()
    return np.array([ds[i][1] for i in range(len(ds))])


def open_labelled(spec: str, image_size: int):
    """A labelled data set from a --data / --distractors spec, and a short name for it."""
    if spec.startswith("synthetic"):
        opts = dict(ids=100, per_id=6, size=image_size, seed=0, offset=0)
        if ":" in spec:
            for kv in spec.split(":", 1)[1].split(","):
                k, _, v = kv.partition("=")
                if k not in opts:
                    raise ValueError(f"unknown synthetic option {k!r} in {spec!r}; known: {sorted(opts)}")
                try:
                    opts[k] = int(v)
                except ValueError:
                    raise ValueError(f"synthetic option {k} in {spec!r} must be an integer, got {v!r}") from None
        ds = SyntheticFaces(opts["ids"], opts["per_id"], opts["size"], opts["seed"], identity_offset=opts["offset"]).load(True)
        return ds, "synthetic"
    if spec.endswith(".rec"):
        return RecordIO(spec), os.path.basename(os.path.dirname(os.path.abspath(spec))) or "recordio"
    if os.path.isfile(os.path.join(spec, "train.rec")):
        return RecordIO(os.path.join(spec, "train.rec")), os.path.basename(os.path.normpath(spec))
    if os.path.isdir(spec):
        return ImageFolderFaces(spec), os.path.basename(os.path.normpath(spec))
    raise FileNotFoundError(f"--data {spec!r} is not a .bin, a .rec, a folder with train.rec, an ImageFolder root or 'synthetic'")


EMBEDDING_BYTES = 512 * 4  # one fp32 embedding at the usual 512 dimensions (the memory estimate's unit)


def check_eval_arguments(args: argparse.Namespace) -> None:
    """ValueError naming the option for every value out of its range, before anything is read or embedded;
    sizes whose tensors would not fit in RAM are refused with the estimate (docs: README, Failure behaviour)."""
    from petal_fast.memory import check_fits

    def need(ok: bool, option: str, what: str, value) -> None:
        if not ok:
            raise ValueError(f"{option} must be {what}; got {value!r}")

    need(isinstance(args.image_size, int) and args.image_size >= 16, "--image-size", "an integer >= 16 (pixels)",
         args.image_size)
    need(args.lowres is None or 1 <= args.lowres <= args.image_size, "--lowres",
         f"a resolution in [1, --image-size = {args.image_size}] pixels (it degrades to that size and back; "
         "leave it out for no degradation)", args.lowres)
    need(args.batch_size >= 1, "--batch-size", "an integer >= 1", args.batch_size)
    need(args.num_pairs >= 1, "--num-pairs", "an integer >= 1", args.num_pairs)
    need(args.gallery_per_identity >= 1, "--gallery-per-identity",
         "an integer >= 1 (gallery images per identity; the rest are probes)", args.gallery_per_identity)
    need(math.isfinite(args.open_set_fraction) and 0 <= args.open_set_fraction < 1, "--open-set-fraction",
         "a fraction in [0, 1)", args.open_set_fraction)
    need(args.max_images is None or args.max_images >= 1, "--max-images", "an integer >= 1", args.max_images)
    pixels = 3 * args.image_size ** 2
    # a batch and its mirror as float tensors; the pairs' embeddings; a .bin decoded at --image-size
    check_fits({f"a batch of {args.batch_size} images at {args.image_size} px (and their mirrors)":
                2 * args.batch_size * pixels * 4,
                f"{args.num_pairs:,} verification pairs' embeddings": 2 * args.num_pairs * EMBEDDING_BYTES},
               "this evaluation", "lower --batch-size, --image-size or --num-pairs")


def output_files(out: str) -> list[str]:
    """What ``run_eval`` writes: the ``--out`` folder and its report, table and plots."""
    return [out] + [os.path.join(out, name) for name in ("eval.json", "eval.md", "roc.png", "cmc.png")]


def _check_outputs(args: argparse.Namespace) -> None:
    """The report must not overwrite a data file or land inside an ImageFolder that is being read."""
    from petal_fast.io_guard import check_outputs, data_inputs
    files, folders = [], []
    for spec in list(args.data) + ([args.distractors] if args.distractors else []):
        if not spec.startswith("synthetic"):
            f, d = data_inputs(spec)
            files, folders = files + f, folders + d
    check_outputs("petal-fast eval", output_files(args.out), {"a data set": files},
                  {"an ImageFolder data set": folders})


def run_eval(embed_fn: EmbedFn, args: argparse.Namespace) -> dict[str, dict]:
    """Run every requested protocol on every --data set; write JSON, Markdown, ROC and CMC PNGs to --out."""
    check_eval_arguments(args)
    _check_outputs(args)
    transform = Degrade.fixed(args.lowres, out_size=args.image_size) if args.lowres is not None else None
    kw = dict(batch_size=args.batch_size, flip=not args.no_flip, transform=transform, device=args.device, progress=True)
    results: dict[str, dict] = {}
    distractors = None
    if args.distractors:
        dds, _ = open_labelled(args.distractors, args.image_size)
        distractors = _View(dds, np.arange(len(dds)), args.image_size)
    for spec in args.data:
        suffix = f"@{args.lowres}px" if args.lowres is not None else ""
        if spec.endswith(".bin"):
            if args.protocol == "identification":
                raise ValueError(f"{spec}: a .bin pair file supports only verification")
            images, issame = load_bin(spec, args.image_size, progress=True)
            name = os.path.splitext(os.path.basename(spec))[0] + suffix
            results[name] = verification(embed_fn, images, issame, **kw)
            continue
        ds, name = open_labelled(spec, args.image_size)
        name += suffix
        labels = _labels(ds)
        keep = np.arange(len(ds)) if args.max_images is None else np.arange(min(len(ds), args.max_images))
        labels = labels[keep]
        if args.protocol in ("auto", "both", "verification"):
            pairs = make_pairs(labels, args.num_pairs, args.seed)
            view = _View(ds, keep[pairs.reshape(-1)], args.image_size)
            results[f"{name}/verification"] = verification(embed_fn, view, labels[pairs[:, 0]] == labels[pairs[:, 1]], **kw)
        if args.protocol in ("auto", "both", "identification"):
            g, p = split_gallery_probe(labels, args.gallery_per_identity, args.open_set_fraction, args.seed)
            results[f"{name}/identification"] = identification(
                embed_fn, _View(ds, keep[p], args.image_size), labels[p], _View(ds, keep[g], args.image_size),
                labels[g], distractor_images=distractors, **kw)
    os.makedirs(args.out, exist_ok=True)
    save_report(results, args.out)
    rocs = {k: {"fpr": v["roc"]["fpr"], "tpr": v["roc"]["tpr"], "auc": v["auc"]} for k, v in results.items() if "roc" in v}
    cmcs = {k: v["cmc"] for k, v in results.items() if "cmc" in v}
    if rocs:
        plot_roc(rocs, os.path.join(args.out, "roc.png"))
    if cmcs:
        plot_cmc(cmcs, os.path.join(args.out, "cmc.png"))
    print(markdown_table(results))
    return results
