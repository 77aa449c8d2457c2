"""The demo's results: mean ± std over seeds, the markdown tables, the PETALface-vs-LoRA verdict, plots."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .evaluate import ALPHA_BINS
from .presets import LABELS

METRICS = ("hr_ver", "hr_tar", "xq_rank1", "xq_rank5", "mixed_ver")
HEADERS = {"hr_ver": "HR verification acc", "hr_tar": "HR TAR@FAR=1e-2", "xq_rank1": "cross-quality rank-1",
           "xq_rank5": "cross-quality rank-5", "mixed_ver": "mixed-quality verification acc"}


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def summary(results: dict) -> dict[str, dict]:
    """method → {metric: (mean, std)} over its runs, plus trainable share, img/s and the α bins."""
    out = {}
    for method, runs in results["runs"].items():
        row = {m: mean_std([r[m] for r in runs]) for m in METRICS}
        row["trainable_share"] = runs[0]["trainable"] / max(1, runs[0]["total"])
        row["trainable"] = runs[0]["trainable"]
        row["img_s"] = mean_std([r["images_per_second"] for r in runs]) if runs[0]["images_per_second"] else None
        row["alpha_bins"] = [mean_std([r["alpha_bins"][b] for r in runs]) for b in range(len(ALPHA_BINS) - 1)]
        row["runs"] = len(runs)
        out[method] = row
    return out


def verdict(results: dict, metric: str = "xq_rank1") -> dict | None:
    """PETALface − LoRA on ``metric``: Δ of the means, σ = √(std_P² + std_L²) (the standard deviation of
    the difference of two single runs) and the standard error of Δ, √(std_P²/n_P + std_L²/n_L);
    ``beyond`` when Δ > 2σ (the issue's criterion: beyond 2 std, not merely 2 standard errors)."""
    runs = results["runs"]
    if "petalface" not in runs or "lora" not in runs:
        return None
    (mp, sp), (ml, sl) = (mean_std([r[metric] for r in runs[m]]) for m in ("petalface", "lora"))
    delta, sigma = mp - ml, math.hypot(sp, sl)
    se = math.sqrt(sp ** 2 / len(runs["petalface"]) + sl ** 2 / len(runs["lora"]))
    return {"metric": metric, "delta": delta, "sigma": sigma, "se": se, "beyond": bool(delta > 2 * sigma)}


def low_alpha_share(alpha: dict, below: float = 0.2) -> float:
    """Share of the higher-quality adaptation images whose α falls below ``below`` (from the histogram)."""
    edges, counts = np.asarray(alpha["hist"]["edges"]), np.asarray(alpha["hist"]["counts_hq"])
    return float(counts[edges[1:] <= below + 1e-9].sum() / max(1, counts.sum()))


def _pm(ms: tuple[float, float], runs: int) -> str:
    m, s = ms
    if math.isnan(m):
        return "—"
    return f"{100 * m:.1f}" if runs == 1 else f"{100 * m:.1f} ± {100 * s:.1f}"


def markdown(results: dict) -> str:
    """The main table, the α line and the verdict (README), then the per-α-bin table (docs)."""
    meta, alpha, rows = results["_meta"], results["alpha"], summary(results)
    cols = ["method", "trainable (% of backbone)", *(f"{HEADERS[m]} (%)" for m in METRICS), "train img/s"]
    text = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for method, r in rows.items():
        speed = "—" if r["img_s"] is None else f"{r['img_s'][0]:.0f}"
        text += (f"| {LABELS.get(method, method)} | {100 * r['trainable_share']:.2f}% ({r['trainable']:,}) | "
                 + " | ".join(_pm(r[m], r["runs"]) for m in METRICS) + f" | {speed} |\n")
    a, hq, lq = alpha["train"], alpha["train_hq"], alpha["train_lq"]
    text += (f"\nα of the adaptation set (BRISQUE, τ = median {alpha['tau_ref']:.1f}, k = 0.02): mean "
             f"{a['mean']:.2f}, std {a['std']:.2f}, quantiles 10/50/90 % {a['q10']:.2f} / {a['q50']:.2f} / "
             f"{a['q90']:.2f}; higher-quality images {hq['mean']:.2f} ± {hq['std']:.2f}, low-quality "
             f"{lq['mean']:.2f} ± {lq['std']:.2f}; {100 * low_alpha_share(alpha):.0f}% of the higher-quality images "
             "have α < 0.2.\n")
    v = verdict(results)
    if v is not None:
        text += (f"\nPETALface − LoRA, cross-quality rank-1: {100 * v['delta']:+.1f} points; σ of the difference "
                 f"of two runs {100 * v['sigma']:.1f}, standard error of Δ {100 * v['se']:.1f}: "
                 f"{'beyond' if v['beyond'] else 'not beyond'} 2σ.\n")
    text += (f"\nPreset `{meta['preset']}` on {meta['device']} ({meta['threads']} threads), {meta['image_size']} px "
             f"input, {meta['seeds']} seeds per adapted method (mean ± sample std), total "
             f"{meta['seconds'] / 60:.1f} min (load average {meta['load'][0]:.1f} at the start, "
             f"{meta['load'][1]:.1f} at the end). Higher quality: {meta['levels']['high']}; low quality: "
             f"{meta['levels']['low']}.\n")
    return text + "\n" + alpha_bin_table(results) + "\n" + runs_table(results)


def alpha_bin_table(results: dict) -> str:
    """Rank-1 against the higher-quality gallery per probe α bin (reference α), mean ± std per method."""
    rows, edges = summary(results), ALPHA_BINS
    counts = next(iter(results["runs"].values()))[0].get("bin_counts")
    heads = [f"α {edges[b]:.1f}–{edges[b + 1]:.1f}" + (f" ({counts[b]} probes)" if counts else "")
             for b in range(len(edges) - 1)]
    text = "| method | " + " | ".join(heads) + " |\n|" + "---|" * (len(heads) + 1) + "\n"
    for method, r in rows.items():
        text += f"| {LABELS.get(method, method)} | " + " | ".join(_pm(ms, r["runs"]) for ms in r["alpha_bins"]) + " |\n"
    return text


def runs_table(results: dict) -> str:
    """Every run: seed, its calibrated τ (PETALface), final loss, throughput and metrics."""
    text = ("| method | seed | τ | final loss | img/s | " + " | ".join(f"{HEADERS[m]} (%)" for m in METRICS)
            + " |\n|" + "---|" * (5 + len(METRICS)) + "\n")
    for method, runs in results["runs"].items():
        for r in runs:
            tau = f"{r['tau']:.1f}" if "tau" in r else "—"
            loss = f"{r['final_loss']:.2f}" if "final_loss" in r else "—"
            speed = "—" if r["images_per_second"] is None else f"{r['images_per_second']:.0f}"
            text += (f"| {LABELS.get(method, method)} | {r['seed']} | {tau} | {loss} | {speed} | "
                     + " | ".join(f"{100 * r[m]:.1f}" for m in METRICS) + " |\n")
    return text


def write_outputs(results: dict, out: Path, echo: bool = True) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    table = markdown(results)
    (out / "results.md").write_text(table)
    from .plots import plot_alpha_bins, plot_alpha_hist, plot_cmc_mean, plot_summary
    rows = summary(results)
    plot_alpha_hist(results["alpha"], out / "alpha_hist.png")
    plot_alpha_bins(rows, out / "alpha_bins.png")
    plot_summary(rows, out / "summary.png")
    plot_cmc_mean(results["runs"], out / "cross_quality_cmc.png")
    if echo:
        print("\n" + table)
