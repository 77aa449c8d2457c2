"""Deployable PETALface: ``torch.export`` (.pt2) and ONNX files that run without petal_fast.

    petal-fast export --checkpoint RUN_DIR --format onnx|pt2 --alpha VALUE|input --output FILE

- ``--alpha VALUE``: every PetalLinear is merged at that α (W ← W + s·((1 − α) B_lr A_lr + α B_hr A_hr);
  the feature LoRA: W ← W + s·B A), so the file is the plain backbone: ``images → embeddings``,
  zero adapter overhead.
- ``--alpha input``: the quality-aware model, ``(images, alpha) → embeddings`` with α (one value per
  image) a graph input. While exporting, PetalLinear records its ATen composition (``ops.petal_linear``):
  y = x Wᵀ + b + ((c ⊙ x A_catᵀ)) B_catᵀ with c = [s(1 − α_i), s·α_i] per row, so ONNX Runtime,
  ``torch.export.load`` and other runtimes need no petal_fast — for any model holding PetalLinear
  layers, exported with plain ``torch.export`` / ``torch.onnx.export(..., dynamo=True)``.

Inputs are images in the model's input range ([−1, 1], insightface normalisation) at the backbone's
size; outputs are the raw (unnormalised) embeddings, ``model.embedding`` in PyTorch. The batch
dimension is dynamic (the quality measure is not part of the file: compute α beforehand).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from petal_fast.atomic_files import atomic_write
from petal_fast.nn import PetalLinear
from petal_fast.nn.context import alpha_scope

FORMATS = ("onnx", "pt2")


class Embedder(nn.Module):
    """``images [, alpha] → raw embeddings`` of a PetalFace (or any FaceModel), the exported function."""

    def __init__(self, model: nn.Module, alpha_input: bool) -> None:
        super().__init__()
        self.model, self.alpha_input = model, alpha_input

    def forward(self, images: torch.Tensor, alpha: torch.Tensor | None = None) -> torch.Tensor:
        if not self.alpha_input:
            return self.model.backbone(images)
        with alpha_scope(alpha):
            return self.model.backbone(images)


def prepare(model: nn.Module, alpha: float | str) -> Embedder:
    """An eval-mode :class:`Embedder`: merged at a fixed α (a float in [0, 1]) or with α as an input."""
    model = model.eval()
    if alpha == "input":
        return Embedder(model, alpha_input=True)
    value = float(alpha)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--alpha must be a number in [0, 1] or 'input', got {alpha!r}")
    for layer in model.modules():
        if isinstance(layer, PetalLinear) and not layer.merged:
            layer.merge_(value if layer.branches == 2 else None)
    return Embedder(model, alpha_input=False)


def example_inputs(embedder: Embedder, image_size: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    device = next(embedder.parameters()).device
    images = torch.rand(batch, 3, image_size, image_size, device=device) * 2 - 1
    return (images, torch.rand(batch, device=device)) if embedder.alpha_input else (images,)


def export_program(embedder: Embedder, image_size: int) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch (PetalLinear records plain ATen operations while exporting)."""
    args = example_inputs(embedder, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = {"images": {0: batch}, "alpha": {0: batch}} if embedder.alpha_input else {"images": {0: batch}}
    with torch.no_grad():
        program = torch.export.export(embedder, args, dynamic_shapes=shapes, strict=False)
    return program.run_decompositions()


def export(model: nn.Module, image_size: int, fmt: str, alpha: float | str, output: str | Path) -> Path:
    """Write ``output`` (.pt2 or .onnx) for ``model`` at a fixed α or with α as an input."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    embedder = prepare(model, alpha)
    program = export_program(embedder, image_size)
    leftover = {str(n.target) for n in program.graph.nodes if "petal_fast" in str(n.target)}
    if leftover:
        raise RuntimeError(f"export: petal_fast operators left in the graph: {sorted(leftover)}")
    if fmt == "pt2":
        atomic_write(output, lambda f: torch.export.save(program, f))
        load_pt2(output)  # what it wrote loads without unpickling code (see load_pt2)
    else:
        try:
            onnx = torch.onnx.export(program, args=example_inputs(embedder, image_size),
                                     input_names=["images", "alpha"] if embedder.alpha_input else ["images"],
                                     output_names=["embeddings"], dynamo=True)
        except ImportError as err:
            raise RuntimeError(f"ONNX export needs the `onnx` and `onnxscript` packages ({err}): "
                               "pip install 'petal_fast[export]'") from err
        onnx.save(str(output))
    return output


_ENV_LOCK = threading.Lock()


def load_pt2(path: str | Path) -> torch.export.ExportedProgram:
    """Load a ``.pt2`` (``torch.export.save``) without running code from the file.

    ``torch.export.load`` unpickles parts of the archive: tensors it stores with ``use_pickle``, the
    example inputs (it retries them with ``weights_only=False`` when the safe loader refuses), custom
    and opaque objects (``pickle.loads``): a tampered file runs code. Here the archive is first checked
    for custom / opaque objects (refused), then loaded with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, so every
    pickle inside goes through torch's weights-only unpickler (tensors and plain containers only).
    The files ``petal-fast export`` writes hold neither, so they load. The variable is set for the
    duration of the call, under a lock (other threads loading pickles meanwhile are restricted too)."""
    import zipfile
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".pt2 file not found: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: not a .pt2 archive ({err})") from None
    objects = [n for n in names
               if "/data/constants/" in n and n.rsplit("/", 1)[-1].startswith(("custom_obj_", "opaque_obj_"))]
    if objects:
        raise ValueError(f"{path}: refusing to load: it holds pickled Python objects ({', '.join(objects[:3])}), "
                         "which torch.export.load would unpickle and which can run code. Load it with "
                         "torch.export.load only if you trust where it came from")
    with _ENV_LOCK:
        before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
        try:
            return torch.export.load(str(path))
        except Exception as err:  # noqa: BLE001 - the weights-only unpickler's refusal, or a corrupt file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: refusing to load: not a .pt2 that loads without running pickled code "
                             f"({type(err).__name__}: {first}). Load it with torch.export.load only if you trust "
                             "where it came from") from None
        finally:
            if before is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="petal-fast export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="run directory of `petal-fast train` or its model.pt")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--alpha", required=True, help="a fixed α in [0, 1] (merged into W) or 'input'")
    ap.add_argument("--output", required=True, help="the file to write (.onnx or .pt2)")
    ap.add_argument("--partial-load", action="store_true",
                    help="load only the tensors of model.pt that fit (default: all must, or it is an error)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    from petal_fast.io_guard import check_outputs
    from petal_fast.train import image_size_of, load_trained, trained_inputs
    check_outputs("petal-fast export", [args.output], trained_inputs(args.checkpoint))
    if Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a folder: name the file to write (e.g. "
                         f"{Path(args.output) / ('model.' + args.format)})")
    model = load_trained(args.checkpoint, "cpu", partial=args.partial_load)
    path = export(model, image_size_of(model), args.format, args.alpha, args.output)
    kind = "α as input (images, alpha)" if args.alpha == "input" else f"merged at α = {float(args.alpha)} (images)"
    print(f"wrote {path} ({args.format}, {kind} → embeddings, dynamic batch)")
    return 0
