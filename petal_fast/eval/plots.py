"""ROC and CMC curves as PNG (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os

import numpy as np


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, ax, path: str, title: str) -> str:
    """Title, legend, write the PNG (creating its folder), close the figure."""
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_roc(curves: dict[str, dict], path: str, title: str = "ROC") -> str:
    """``curves``: name → {"fpr": [...], "tpr": [...], optional "auc"}; log-scaled FAR axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for name, c in curves.items():
        fpr, tpr = np.asarray(c["fpr"]), np.asarray(c["tpr"])
        keep = fpr > 0
        label = f"{name} (AUC {c['auc']:.4f})" if "auc" in c else name
        ax.plot(fpr[keep], tpr[keep], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("False accept rate")
    ax.set_ylabel("True accept rate")
    ax.set_ylim(0, 1.01)
    ax.grid(True, which="both", alpha=0.3)
    return _save(plt, fig, ax, path, title)


def plot_cmc(curves: dict[str, list[float]], path: str, title: str = "CMC") -> str:
    """``curves``: name → CMC values at ranks 1, 2, …"""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for name, c in curves.items():
        ax.plot(np.arange(1, len(c) + 1), c, marker=".", label=f"{name} (rank-1 {c[0]:.3f})")
    ax.set_xlabel("Rank")
    ax.set_ylabel("Identification rate")
    ax.set_ylim(0, 1.01)
    ax.grid(True, alpha=0.3)
    return _save(plt, fig, ax, path, title)
