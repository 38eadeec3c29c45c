"""Figures of a comparison, drawn from run directories with matplotlib (Agg, no display)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metrics(run: Path) -> List[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def learning_curves(out: Path, groups: Dict[str, List[str]], path: Path) -> Path:
    """Validation accuracy and loss per epoch: mean over seeds, band = min..max."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in groups.items():
        curves = [_metrics(out / "runs" / r) for r in runs]
        n = min((len(c) for c in curves), default=0)
        if n == 0:
            continue
        epochs = np.arange(1, n + 1)
        for ax, key in zip(axes, ("val_acc", "val_loss")):
            vals = np.array([[c[i][key] for i in range(n)] for c in curves])
            line, = ax.plot(epochs, vals.mean(0), label=name)
            ax.fill_between(epochs, vals.min(0), vals.max(0), alpha=0.15, color=line.get_color())
    from matplotlib.ticker import MaxNLocator

    for ax, title in zip(axes, ("validation accuracy", "validation loss")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title + " (mean over seeds, band = min..max)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_time(finals: Dict[str, List[dict]], path: Path) -> Path:
    """Test accuracy against training wall time per run, one colour per arm."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, fs in finals.items():
        ax.scatter([f["seconds"] for f in fs], [f["acc1"] for f in fs], label=name, s=20)
    ax.set_xlabel("training seconds per run")
    ax.set_ylabel("test acc1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusions(finals: Dict[str, List[dict]], classes: List[str], path: Path) -> Path:
    """Row-normalised confusion matrix per arm, summed over seeds."""
    plt = _plt()
    k = len(finals)
    cols = min(4, k)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (name, fs) in zip(axes.flat, finals.items()):
        m = np.sum([np.array(f["confusion"], dtype=float) for f in fs], axis=0)
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(classes)))
        ax.set_yticks(range(len(classes)))
        ax.set_xticklabels(classes, rotation=90, fontsize=6)
        ax.set_yticklabels(classes, fontsize=6)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
