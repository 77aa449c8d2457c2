"""Evaluation results as JSON and as a Markdown table."""
from __future__ import annotations

import os

from petal_fast.jsonio import dumps


def _fmt(v) -> str:
    return "—" if v is None else f"{100 * v:.2f}"


def _point(d: dict | None, key: str) -> str:
    """An operating point in %, marked † when too few negatives back it (JSON 'resolved': false)."""
    if not d:
        return "—"
    return _fmt(d.get(key)) + ("" if d.get("resolved", True) else "†")


def markdown_table(results: dict[str, dict]) -> str:
    """One row per data set: verification (acc, AUC, TAR@FAR) and identification (rank-k, TPIR@FPIR), in %."""
    ver = {k: v for k, v in results.items() if "accuracy" in v}
    ide = {k: v for k, v in results.items() if "rank" in v}
    lines = []
    if ver:
        fars = sorted({f for v in ver.values() for f in v["tar_at_far"]}, key=float)
        lines += ["| data set | pairs | accuracy | ± std | AUC | " + " | ".join(f"TAR@FAR={f}" for f in fars) + " |",
                  "|---" * (5 + len(fars)) + "|"]
        for name, v in ver.items():
            tars = [_point(v["tar_at_far"].get(f), "tar") for f in fars]
            lines.append(f"| {name} | {v['num_pairs']} | {_fmt(v['accuracy'])} | {_fmt(v['accuracy_std'])} | "
                         f"{_fmt(v['auc'])} | " + " | ".join(tars) + " |")
    if ide:
        if lines:
            lines.append("")
        ranks = sorted({k for v in ide.values() for k in v["rank"]}, key=int)
        fpirs = sorted({f for v in ide.values() for f in v.get("tpir_at_fpir", {})}, key=float)
        lines += ["| data set | probes | gallery | " + " | ".join(f"rank-{k}" for k in ranks)
                  + "".join(f" | TPIR@FPIR={f}" for f in fpirs) + " |", "|---" * (3 + len(ranks) + len(fpirs)) + "|"]
        for name, v in ide.items():
            cells = [_fmt(v["rank"].get(k)) for k in ranks]
            cells += [_point(v.get("tpir_at_fpir", {}).get(f), "tpir") for f in fpirs]
            lines.append(f"| {name} | {v['num_probes']} | {v['num_gallery']} | " + " | ".join(cells) + " |")
    if any("†" in line for line in lines):
        lines += ["", "† FAR·(impostor pairs) or FPIR·(non-mated probes) < 1: the operating point is not backed by a single negative."]
    return "\n".join(lines) + "\n"


def save_report(results: dict[str, dict], out_dir: str, stem: str = "eval") -> dict[str, str]:
    """Write ``<stem>.json`` (everything, curves included) and ``<stem>.md`` (the table)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "markdown": os.path.join(out_dir, f"{stem}.md")}
    with open(paths["json"], "w") as f:
        f.write(dumps(results, indent=1))
    with open(paths["markdown"], "w") as f:
        f.write(markdown_table(results))
    return paths
