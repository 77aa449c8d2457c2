"""PetalLinear's cost per eager call on CPU at the demo model's shapes, against ``F.linear``.

    python -m benchmarks --suite calls [--quick]        python -m benchmarks.bench_cpu_calls [--quick]

Shapes: every adapted layer of the model ``make demo`` trains (preset ``cpu``: Swin ``tiny``, batch 64),
read from that model by forward hooks, so they follow the demo: the two-branch ``attn.qkv`` layers and
the one-branch feature layer. Each layer is timed at the demo's batch (``batch64``), at one image
(``batch1``), and at one row (``row1``: the work is nil, so the time is the call's fixed host cost).

Providers, modes and flop counts as in ``bench_petal_linear`` (``base`` = frozen ``F.linear``, the floor;
``fused`` = PetalLinear on the C++ backend; ``addmm`` = the torch composition; ``reference`` = the
released eager layer; ``fused_1b`` / ``peft`` = one branch of rank 2r). Modes: ``fwd`` = inference
(``no_grad``), ``full`` = a training call (forward + ``autograd.grad`` of x, A, B), dropout 0.1 as the
demo trains. Rows carry the ratio to ``base``.

The run ends with ``calls: ...``: the fused layer's fixed cost per call over ``F.linear`` (``row1``) and
its ratio to ``F.linear`` at the demo's batch, for the worst shape.
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from benchmarks.bench_petal_linear import build_case
from benchmarks.common import append_rows, print_table, summary_rows, time_interleaved
from petal_fast.progress import progress

SUITE = "calls"
RANK, DROPOUT, BATCH = 8, 0.1, 64
MODES = ("fwd", "full")


def demo_layers(batch: int = BATCH) -> list[tuple[int, int, int, int, int]]:
    """(M, K, N, images, branches) of every distinct PetalLinear call in one training forward of the demo's
    model at ``batch`` images (its backbone and class count as the ``cpu`` preset builds them)."""
    from petal_fast.demo import PRESETS
    from petal_fast.models import build_model
    from petal_fast.models.presets import SWIN_PRESETS
    from petal_fast.nn.petal_linear import PetalLinear

    preset = PRESETS["cpu"]
    torch.manual_seed(0)
    model = build_model("petalface", preset.backbone, num_classes=preset.adapt_identities, rank=RANK,
                        dropout=DROPOUT, quality=None)
    seen: dict[tuple, None] = {}

    def record(layer, args, _out) -> None:
        m = args[0].numel() // layer.in_features
        seen[(m, layer.in_features, layer.out_features, batch, layer.branches)] = None

    hooks = [mod.register_forward_hook(record) for mod in model.modules() if isinstance(mod, PetalLinear)]
    size = SWIN_PRESETS[preset.backbone]["img_size"]
    with torch.no_grad():
        model.embedding(torch.rand(batch, 3, size, size), alpha=torch.rand(batch))
    for h in hooks:
        h.remove()
    return list(seen)


def cases(quick: bool) -> list[tuple[str, int, int, int, int, int]]:
    """(case, M, K, N, images, branches): each demo layer at batch 64, one image and one row."""
    out = []
    for m, k, n, images, branches in demo_layers():
        rows_per_image = m // images
        out += [("batch64", m, k, n, images, branches), ("batch1", rows_per_image, k, n, 1, branches),
                ("row1", 1, k, n, 1, branches)]
    return out[:3] if quick else out


def _providers_for(branches: int, calls: dict[str, Callable]) -> dict[str, Callable]:
    """The providers that compute this layer: the two-branch ones, or the one-branch pair and the floor."""
    keep = ("base", "fused_1b", "peft") if branches == 1 else ("base", "fused", "addmm", "reference")
    return {name: calls[name] for name in keep if name in calls}


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    """Time every case on this CPU (``device`` is ignored: the suite measures CPU calls)."""
    repeat = 20 if quick else 200
    rows = []
    for case, m, k, n, images, branches in progress(cases(quick), desc="PetalLinear calls", unit="case"):
        for mode in MODES:
            torch.manual_seed(0)
            calls, work, _ = build_case(m, k, n, RANK, DROPOUT, mode, "cpu", torch.float32, images=images)
            calls = _providers_for(branches, calls)
            samples = time_interleaved(calls, "cpu", warmup=10, repeat=repeat)
            case_rows = summary_rows(SUITE, "cpu", case, f"M={m} K={k} N={n} images={images} branches={branches}",
                                     "float32", mode, samples, baseline="base",
                                     notes="ratio = provider / frozen F.linear; eager calls, dropout 0.1 in full",
                                     flops={name: work[name] for name in calls})
            append_rows(SUITE, case_rows)
            rows += case_rows
    return rows


def summary_line(rows: list[dict]) -> str:
    """``calls: fixed cost +<a> us fwd, +<b> us fwd+bwd over F.linear; demo batch <c>x fwd, <d>x fwd+bwd``
    (worst layer each), from the fused provider's time rows (``fused_1b`` for a one-branch layer)."""
    fixed: dict[str, float] = {}
    ratio: dict[str, float] = {}
    base: dict[tuple, float] = {}
    fused: dict[tuple, float] = {}
    for r in rows:
        if r["metric"] != "time":
            continue
        key = (r["case"], r["shape"], r["mode"])
        if r["provider"] == "base":
            base[key] = float(r["median"])
        elif r["provider"] in ("fused", "fused_1b"):
            fused[key] = float(r["median"])
    for key, ms in fused.items():
        case, _, mode = key
        if key not in base:
            continue
        if case == "row1":
            fixed[mode] = max(fixed.get(mode, 0.0), (ms - base[key]) * 1e3)
        elif case == "batch64":
            ratio[mode] = max(ratio.get(mode, 0.0), ms / base[key])
    text = lambda d, fmt: ", ".join(f"{fmt(d[m])} {'fwd' if m == 'fwd' else 'fwd+bwd'}" for m in MODES if m in d)  # noqa: E731
    return (f"calls: fixed cost {text(fixed, lambda v: f'+{v:.0f} us')} over F.linear; "
            f"demo batch {text(ratio, lambda v: f'{v:.2f}x')} (worst layer)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one layer, few repeats (smoke run)")
    args = ap.parse_args()
    rows = run(args.quick)
    print_table(rows, "PetalLinear calls on CPU (ratio = provider / frozen F.linear)")
    print(summary_line(rows))


if __name__ == "__main__":
    main()
