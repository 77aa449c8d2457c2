"""The demo's plots (matplotlib, Agg): the training set's α, accuracy per α bin, the summary, the CMC."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from petal_fast.eval.plots import _pyplot

from .evaluate import ALPHA_BINS
from .presets import LABELS


def _finish(plt, fig, ax, path: Path, title: str, **legend) -> None:
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, **legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_alpha_hist(alpha: dict, path: Path) -> None:
    """Histogram of the adaptation set's α, the higher- and low-quality images stacked."""
    plt = _pyplot()
    h = alpha["hist"]
    edges = np.asarray(h["edges"])
    mid, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    ax.bar(mid, h["counts_lq"], width * 0.95, label="low-quality images")
    ax.bar(mid, h["counts_hq"], width * 0.95, bottom=h["counts_lq"], label="higher-quality images")
    ax.set_xlabel("α from BRISQUE (0: low-quality branch, 1: high-quality branch)")
    ax.set_ylabel("images")
    a = alpha["train"]
    _finish(plt, fig, ax, path, f"α of the adaptation set: mean {a['mean']:.2f}, std {a['std']:.2f}")


def plot_alpha_bins(rows: dict, path: Path) -> None:
    """Rank-1 (mean ± std over seeds) per probe α bin, one line per method."""
    plt = _pyplot()
    mids = (ALPHA_BINS[:-1] + ALPHA_BINS[1:]) / 2
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for i, (method, r) in enumerate(rows.items()):
        m = np.array([ms[0] for ms in r["alpha_bins"]]) * 100
        s = np.array([ms[1] for ms in r["alpha_bins"]]) * 100
        ax.errorbar(mids + (i - 2) * 0.008, m, yerr=s, marker="o", capsize=3, label=LABELS.get(method, method))
    ax.set_xticks(ALPHA_BINS)
    ax.set_xlabel("probe α (reference mapping of its BRISQUE score)")
    ax.set_ylabel("rank-1 vs higher-quality gallery (%)")
    _finish(plt, fig, ax, path, "Identification by probe quality")


def plot_summary(rows: dict, path: Path) -> None:
    """Bars (mean ± std) of HR verification, cross-quality rank-1 and mixed-quality verification."""
    plt = _pyplot()
    metrics = (("hr_ver", "HR verification acc"), ("xq_rank1", "cross-quality rank-1"),
               ("mixed_ver", "mixed-quality verification acc"))
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    x = np.arange(len(rows))
    w = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics):
        ax.bar(x + (j - 1) * w, [100 * r[key][0] for r in rows.values()], w,
               yerr=[100 * r[key][1] for r in rows.values()], capsize=3, label=label)
    ax.set_xticks(x, [LABELS.get(m, m) for m in rows], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 118)
    _finish(plt, fig, ax, path, "PETALface demo on synthetic faces (mean ± std over seeds)", loc="upper center",
            ncol=3)


def plot_cmc_mean(runs: dict, path: Path) -> None:
    """Cross-quality CMC, the mean over each method's seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for method, rs in runs.items():
        curve = np.mean([r["xq_cmc"] for r in rs], axis=0) * 100
        ax.plot(np.arange(1, len(curve) + 1), curve, label=LABELS.get(method, method))
    ax.set_xscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate (%)")
    _finish(plt, fig, ax, path, "Cross-quality identification (CMC)")
