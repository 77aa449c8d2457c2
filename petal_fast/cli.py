"""``petal-fast`` console commands: train, demo, eval, export, bench, info."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from petal_fast.user_errors import report_errors

def _eval(argv: Sequence[str]) -> int:
    from petal_fast.eval import add_eval_arguments, run_eval
    from petal_fast.train import image_size_of, load_trained, prepare_images
    import torch

    ap = argparse.ArgumentParser(prog="petal-fast eval", description="Evaluate a trained model (verification "
                                 "on .bin pairs, identification on RecordIO / ImageFolder / synthetic sets).")
    ap.add_argument("--checkpoint", required=True, help="run directory of `petal-fast train` or its model.pt")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--partial-load", action="store_true",
                    help="load only the tensors of model.pt that fit (default: all must, or it is an error)")
    add_eval_arguments(ap)
    ap.set_defaults(image_size=None)
    args = ap.parse_args(argv)
    from petal_fast.eval.cli import output_files
    from petal_fast.io_guard import check_outputs
    from petal_fast.train import trained_inputs
    check_outputs("petal-fast eval", output_files(args.out), trained_inputs(args.checkpoint))
    model = load_trained(args.checkpoint, args.device, partial=args.partial_load)
    size = image_size_of(model)
    if args.image_size is None:  # evaluate at the model's own input size unless asked otherwise
        args.image_size = size

    @torch.inference_mode()
    def embed(x01: torch.Tensor) -> torch.Tensor:
        return model.embedding(prepare_images(x01.clone(), size, torch.device(args.device))).float().cpu()

    run_eval(embed, args)
    return 0


def _bench(argv: Sequence[str]) -> int:
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError:
        print("petal-fast bench runs from a source checkout (the benchmarks/ folder): "
              "cd into the repository and run `python -m benchmarks`", file=sys.stderr)
        return 2
    return bench_main(list(argv)) or 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": "train a model (see configs/)", "demo": "the paper's comparison on synthetic faces",
                "eval": "evaluate a trained model", "export": "write a .pt2 / .onnx file of a trained model",
                "bench": "run the benchmarks (source checkout)",
                "info": "versions, and which backend each op runs on CPU / CUDA here"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: petal-fast {train,demo,eval,export,bench,info} [options]\n")
        for name, text in commands.items():
            print(f"  {name:6s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from petal_fast.train import main as train_main
        return train_main(rest)
    if cmd == "demo":
        from petal_fast.demo import main as demo_main
        return report_errors("petal-fast demo", demo_main, rest)
    if cmd == "eval":
        return report_errors("petal-fast eval", _eval, rest)
    if cmd == "export":
        from petal_fast.export import main as export_main
        return report_errors("petal-fast export", export_main, rest)
    if cmd == "info":
        from petal_fast.info import main as info_main
        return info_main(rest)
    return _bench(rest)


if __name__ == "__main__":
    raise SystemExit(main())
