"""Figures of a comparison, drawn from run directories with matplotlib (Agg, no display).

Each function draws one PNG and returns its path, or None when the runs recorded nothing to draw
(older runs, a timm model without attention maps, an experiment without a sweep)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..eval.probes import load_npz
from .stats import is_number


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # arm names are text: "$" is a dollar sign, not TeX
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _npz(path: Path, **ndims: int) -> Optional[dict]:
    """:func:`load_npz` (None when the run did not record it), with the arrays a figure reads
    (name=ndim): a damaged or foreign file is a one-line ValueError naming it."""
    fix = "delete it to report without it, or delete the run to train it again"
    try:
        rec = load_npz(path)
    except Exception as err:  # a damaged file fails in many ways: BadZipFile, zlib.error, EOFError, ...
        raise ValueError(f"{path}: unreadable ({' '.join(str(err).split())[:200] or type(err).__name__}); "
                         f"{fix}") from None
    bad = [f"{k} ({n}-d)" for k, n in ndims.items() if rec is not None and (k not in rec or rec[k].ndim != n)]
    if bad:
        raise ValueError(f"{path}: not a vitlab {path.name} (no array {', '.join(bad)}); {fix}")
    return rec


def _metrics(run: Path) -> List[dict]:
    from ..train.loop import read_metrics  # drops a torn line, as training does when it resumes

    lines = read_metrics(run / "metrics.jsonl")
    for i, line in enumerate(lines, 1):
        if not (isinstance(line, dict) and all(is_number(line.get(k)) for k in ("val_acc", "val_loss"))):
            raise ValueError(f"{run / 'metrics.jsonl'}: entry {i} is not an epoch's metrics (no numeric val_acc and "
                             f"val_loss); delete {run} to report without it, or to train it again with "
                             f"`vitlab compare`")
    return lines


def _panels(k: int, width: float, height: float, max_cols: int = 4):
    plt = _plt()
    cols = max(1, min(max_cols, k))
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    return fig, list(axes.flat)[:k]


def learning_curves(runs: Dict[str, List[Path]], path: Path) -> Path:
    """Validation accuracy and loss per epoch: mean over seeds, band = min..max."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _plt().subplots(1, 2, figsize=(11, 4))
    for name, dirs in runs.items():
        curves = [_metrics(d) for d in dirs]
        n = min((len(c) for c in curves), default=0)
        if n == 0:
            continue
        epochs = np.arange(1, n + 1)
        for ax, key in zip(axes, ("val_acc", "val_loss")):
            vals = np.array([[c[i][key] for i in range(n)] for c in curves])
            line, = ax.plot(epochs, vals.mean(0), label=name)
            ax.fill_between(epochs, vals.min(0), vals.max(0), alpha=0.15, color=line.get_color())
    for ax, title in zip(axes, ("validation accuracy", "validation loss")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title + " (mean over seeds, band = min..max)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def accuracy_vs_time(finals: Dict[str, List[dict]], path: Path) -> Path:
    """Test accuracy against training wall time per run, one colour per arm."""
    fig, ax = _plt().subplots(figsize=(6, 4))
    for name, fs in finals.items():
        ax.scatter([f["seconds"] for f in fs], [f["acc1"] for f in fs], label=name, s=20)
    ax.set_xlabel("training seconds per run")
    ax.set_ylabel("test acc1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def confusions(finals: Dict[str, List[dict]], classes: List[str], path: Path) -> Path:
    """Row-normalised confusion matrix per arm, summed over seeds."""
    fig, axes = _panels(len(finals), 3.2, 3.0)
    for ax, (name, fs) in zip(axes, finals.items()):
        m = np.sum([np.array(f["confusion"], dtype=float) for f in fs], axis=0)
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(classes)))
        ax.set_yticks(range(len(classes)))
        ax.set_xticklabels(classes, rotation=90, fontsize=6)
        ax.set_yticklabels(classes, fontsize=6)
    return _save(fig, path)


def roc_curves(runs: Dict[str, List[Path]], classes: List[str], path: Path) -> Optional[Path]:
    """One-vs-rest ROC per class (sklearn's ``roc_curve``), TPR interpolated on a common FPR grid
    and averaged over seeds; one panel per arm. More than 11 classes: the macro average only."""
    from sklearn.metrics import roc_curve

    fpr_grid = np.linspace(0, 1, 201)
    curves: Dict[str, Dict[str, np.ndarray]] = {}
    for name, dirs in runs.items():
        per_class: Dict[str, List[np.ndarray]] = {}
        for d in dirs:
            pred = _npz(d / "predictions.npz", labels=1, probs=2)
            if pred is None:
                continue
            y, p = pred["labels"], pred["probs"]
            tprs = []
            for c in range(p.shape[1]):
                pos = y == c
                if pos.all() or not pos.any():
                    continue
                fpr, tpr, _ = roc_curve(pos, p[:, c])
                tprs.append(np.interp(fpr_grid, fpr, tpr))
                per_class.setdefault(classes[c] if c < len(classes) else str(c), []).append(tprs[-1])
            if tprs:
                per_class.setdefault("macro average", []).append(np.mean(tprs, 0))
        if per_class:
            curves[name] = {k: np.mean(v, 0) for k, v in per_class.items()}
    if not curves:
        return None
    fig, axes = _panels(len(curves), 3.4, 3.2)
    for ax, (name, cs) in zip(axes, curves.items()):
        for label, tpr in cs.items():
            if len(cs) > 12 and label != "macro average":
                continue
            macro = label == "macro average"
            ax.plot(fpr_grid, tpr, lw=2 if macro else 1, color="black" if macro else None, label=label)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, loc="lower right")
    return _save(fig, path)


def resolution_plot(curves: Dict[str, Dict[int, List[Optional[float]]]], path: Path) -> Optional[Path]:
    """Test accuracy against the evaluation image size: mean over seeds, band = min..max."""
    if not curves:
        return None
    fig, ax = _plt().subplots(figsize=(6.5, 4))
    for name, by_h in curves.items():
        hs = sorted(h for h, v in by_h.items() if any(x is not None for x in v))
        if not hs:
            continue
        vals = [[x for x in by_h[h] if x is not None] for h in hs]
        line, = ax.plot(hs, [np.mean(v) for v in vals], marker="o", ms=3, label=name)
        ax.fill_between(hs, [min(v) for v in vals], [max(v) for v in vals], alpha=0.12, color=line.get_color())
    ax.set_xlabel("evaluation image size (px)")
    ax.set_ylabel("test acc1")
    ax.set_title("resolution extrapolation (no retraining)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def attention_grid(runs: Dict[str, List[Path]], classes: List[str], path: Path) -> Optional[Path]:
    """Rows: the test images, then each arm's last-block attention over them (first seed that
    recorded attention.npz), upsampled and laid over the image."""
    import torch
    import torch.nn.functional as F

    rows, images, labels = [], None, None
    for name, dirs in runs.items():
        rec = next((r for r in (_npz(d / "attention.npz", images=4, labels=1, maps=3) for d in dirs) if r is not None),
                   None)
        if rec is None:
            continue
        if images is None:
            images, labels = rec["images"], rec["labels"]
        rows.append((name, rec["maps"]))
    if not rows:
        return None
    k = images.shape[0]
    plt = _plt()
    fig, axes = plt.subplots(len(rows) + 1, k, figsize=(1.6 * k + 1.2, 1.6 * (len(rows) + 1)), squeeze=False)
    grey = images.astype(np.float32).mean(1) / 255.0  # (k, H, W)
    for j in range(k):
        axes[0, j].imshow(grey[j], cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(classes[labels[j]] if labels[j] < len(classes) else str(labels[j]), fontsize=7)
    axes[0, 0].set_ylabel("image", fontsize=7)
    for i, (name, maps) in enumerate(rows, 1):
        up = F.interpolate(torch.from_numpy(maps)[:, None], size=grey.shape[1:], mode="bilinear",
                           align_corners=False)[:, 0].numpy()
        for j in range(min(k, up.shape[0])):
            a = up[j] - up[j].min()
            axes[i, j].imshow(grey[j], cmap="gray", vmin=0, vmax=1)
            axes[i, j].imshow(a / max(a.max(), 1e-12), cmap="inferno", alpha=0.6)
        axes[i, 0].set_ylabel(name, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def sweeps(series: List[dict], metric: str, path: Path) -> Optional[Path]:
    """The metric against one numeric option per panel (mean over seeds, band = min..max)."""
    if not series:
        return None
    fig, axes = _panels(len(series), 4.6, 3.4, max_cols=3)
    for ax, s in zip(axes, series):
        for label, by_x in s["lines"].items():
            xs = sorted(by_x)
            line, = ax.plot(xs, [np.mean(by_x[x]) for x in xs], marker="o", ms=3, label=label)
            ax.fill_between(xs, [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs], alpha=0.12,
                            color=line.get_color())
        ax.set_xlabel(s["key"])
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
