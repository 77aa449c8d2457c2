"""Put a demo run into the repository: its results and plots under ``docs/demo/``, its table in the README.

    python -m petal_fast.demo.readme [demo_output]

Copies ``results.json``, ``results.md``, ``demo.log`` and the plots of the run folder into ``docs/demo/``
and rewrites the README's lines between ``<!-- demo:start -->`` and ``<!-- demo:end -->`` with
:func:`readme_table` of the run (the paragraph after them, what the numbers show, stays hand-written).
Refuses, changing nothing, when the markers are missing or out of order.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .presets import LABELS
from .report import HEADERS, summary, _pm

START, END = "<!-- demo:start -->", "<!-- demo:end -->"
REPO = Path(__file__).resolve().parents[2]
README_METRICS = ("hr_ver", "xq_rank1", "xq_rank5", "mixed_ver")
FILES = ("results.json", "results.md", "demo.log", "summary.png", "alpha_bins.png", "alpha_hist.png",
         "cross_quality_cmc.png")


def readme_table(results: dict) -> str:
    """The README's table: trainable share and the four headline metrics, mean ± std over seeds."""
    cols = ["method", "trainable (% of backbone)", *(f"{HEADERS[m]} (%)" for m in README_METRICS)]
    text = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for method, r in summary(results).items():
        text += (f"| {LABELS.get(method, method)} | {100 * r['trainable_share']:.2f}% ({r['trainable']:,}) | "
                 + " | ".join(_pm(r[m], r["runs"]) for m in README_METRICS) + " |\n")
    return text


def rewrite(readme: str, results: dict) -> str:
    """``readme`` with the region between the markers replaced by the table of ``results``."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start or readme.count(START) != 1 or readme.count(END) != 1:
        raise ValueError(f"README must hold {START} and {END} once each, in that order")
    return readme[:start + len(START)] + "\n" + readme_table(results) + readme[end:]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    run = Path(args[0] if args else "demo_output")
    missing = [f for f in FILES if not (run / f).is_file()]
    if missing:
        print(f"error: {run} is not a finished demo run (missing {', '.join(missing)})", file=sys.stderr)
        return 2
    results = json.loads((run / "results.json").read_text())
    readme = REPO / "README.md"
    try:
        text = rewrite(readme.read_text(), results)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    docs = REPO / "docs" / "demo"
    docs.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(run / f, docs / f)
    readme.write_text(text)
    print(f"copied {len(FILES)} files to {docs}; rewrote the demo table in {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
