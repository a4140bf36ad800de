"""PNG figures of the OOD detection stage; nothing is shown on screen.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas, so pyplot's global
figure registry (and any interactive backend) is never touched; each figure is released after saving.
Files are written atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator, ScalarFormatter
from sklearn.metrics import roc_curve

from ddpm_ood.fileio import atomic_path
from ddpm_ood.ood.metrics import labels_and_scores
from ddpm_ood.ood.zscore import DEFAULT_SCORE
from ddpm_ood.seeding import DEFAULT_SEED

IN_COLOR = "tab:blue"
OUT_COLOR = "tab:red"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # attaches the Agg canvas: rendering never needs a display
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and release it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    fig.clear()
    return path


def plot_roc_curves(
    in_scores: np.ndarray, out_scores: Mapping[str, np.ndarray], path: str | os.PathLike, title: str = ""
) -> Path:
    """ROC curve (FPR on x, TPR on y, OOD = positive) of each out set against the same in-set scores."""
    fig = _new_figure(5.5, 5)
    ax = fig.add_subplot()
    for name, scores in out_scores.items():
        labels, s = labels_and_scores(in_scores, scores)
        fpr, tpr, _ = roc_curve(labels, s)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance")
    ax.set(xlabel="false-positive rate (in-distribution flagged)", ylabel="true-positive rate (OOD flagged)",
           xlim=(0, 1), ylim=(0, 1.01), title=title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_auroc_vs_nfe(summary: pd.DataFrame, path: str | os.PathLike, title: str = "") -> Path:
    """AUROC against network evaluations per image (log x), one marker per score and out set (colour = out set),
    each score's mean over the out sets as a labelled black cross (``ood.metrics.SUMMARY_COLUMNS`` rows)."""
    fig = _new_figure(6.5, 4.5)
    ax = fig.add_subplot()
    rows = summary[summary["nfe"] > 0]
    for name, group in rows.groupby("out_set", sort=False):
        ax.scatter(group["nfe"], group["auroc"], s=18, alpha=0.7, label=str(name))
    for score, group in rows.groupby("score", sort=False):
        nfe, auroc = float(group["nfe"].iloc[0]), float(group["auroc"].mean())
        ax.scatter([nfe], [auroc], marker="x", color="black")
        ax.annotate(str(score), (nfe, auroc), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    if len(rows):
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(rows["nfe"].astype(int))))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="network evaluations per image (nfe)", ylabel="AUROC", ylim=(0, 1.01), title=title)
    if len(rows):
        ax.legend(fontsize="small", title="out set")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_auroc_per_t(
    per_t: pd.DataFrame, path: str | os.PathLike, metric: str = DEFAULT_SCORE, title: str = ""
) -> Path:
    """AUROC of the per-t score against start t, one line per out set (``ood.detection.auroc_per_t`` rows)."""
    fig = _new_figure(6.5, 4.5)
    ax = fig.add_subplot()
    rows = per_t[per_t["metric"] == metric]
    for name, group in rows.groupby("out_set", sort=False):
        group = group.sort_values("t")
        ax.plot(group["t"], group["auroc"], marker=".", label=str(name))
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="start t", ylabel=f"AUROC ({metric} at this t)", ylim=(0, 1.01), title=title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)


def _sample_curves(z: pd.DataFrame, score: str, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Up to ``n`` images drawn without replacement: a (t, image) table of the per-t score."""
    table = z.pivot(index="t", columns="filename", values=score).sort_index()
    if table.shape[1] > n:
        table = table.iloc[:, np.sort(rng.choice(table.shape[1], size=n, replace=False))]
    return table


def plot_zscore_vs_t(
    in_z: pd.DataFrame,
    out_z: Mapping[str, pd.DataFrame],
    path: str | os.PathLike,
    score: str = DEFAULT_SCORE,
    n_per_set: int = 50,
    seed: int = DEFAULT_SEED,
    title: str = "",
) -> Path:
    """Upstream's diagnostic: per-t score vs start t for up to ``n_per_set`` in (blue) and out (red) images.

    One panel per out set; inputs are ``ood.zscore.z_scores`` frames. The image sample is drawn with
    ``numpy.random.default_rng(seed)`` (the same in-set sample in every panel).
    """
    rng = np.random.default_rng(seed)
    in_table = _sample_curves(in_z, score, n_per_set, rng)
    n = max(len(out_z), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _new_figure(4.5 * cols, 3.5 * rows)
    for i, (name, oz) in enumerate(out_z.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        out_table = _sample_curves(oz, score, n_per_set, rng)
        in_lines = ax.plot(in_table.index, in_table.to_numpy(), color=IN_COLOR, alpha=0.4, lw=0.8)
        out_lines = ax.plot(out_table.index, out_table.to_numpy(), color=OUT_COLOR, alpha=0.4, lw=0.8)
        ax.legend([in_lines[0], out_lines[0]], [f"in ({in_table.shape[1]})", f"{name} ({out_table.shape[1]})"],
                  fontsize="small")
        ax.set(xlabel="start t", ylabel=f"z-score ({score})", title=str(name))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
