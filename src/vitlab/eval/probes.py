"""What a run measures on its test set after training, for the comparison report:

- ``resolution_sweep``: accuracy at other image sizes than trained (the relative PEs' promise:
  new coordinates, no retraining; learned tables are resized, sincos recomputed);
- ``attention_summary``: where the last block looks, for a few test images;
- ``predictions.npz`` (written by the training loop's evaluation, ``save_npz``): labels and class
  probabilities, from which the report draws ROC curves.

Each writes plain arrays (``.npz``) or JSON-ready dicts into the run directory, the only interface
between training and reporting.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import rundir

AUTO_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5)


def auto_resolutions(img_size: Sequence[int], patch: Sequence[int]) -> List[int]:
    """0.5x .. 1.5x the training height, each rounded to a whole number of patches (2D only)."""
    if len(img_size) != 2:
        return []
    h, p = int(img_size[0]), int(patch[0])
    sizes = {max(p, int(round(h * f / p)) * p) for f in AUTO_FACTORS}
    return sorted(sizes)


def scaled_size(height: int, img_size: Sequence[int], patch: Sequence[int]) -> Tuple[int, int]:
    """(height, width) keeping the training aspect ratio, the width rounded to the patch."""
    h, w = int(img_size[0]), int(img_size[1])
    pw = int(patch[1])
    return int(height), max(pw, int(round(w * height / h / pw)) * pw)


def resolution_sweep(predict_at: Callable[[Tuple[int, int]], torch.Tensor], labels: torch.Tensor,
                     heights: Sequence[int], img_size: Sequence[int], patch: Sequence[int],
                     num_classes: int) -> List[dict]:
    """Top-1 accuracy and loss at each height in ``heights``. ``predict_at(size)`` returns the
    logits (N, classes) of the sweep's test images resized to ``size``; a size the model cannot
    take (say a timm ViT with a fixed position table) is recorded with its error, not raised."""
    from .metrics import classification_metrics

    out = []
    for height in heights:
        size = scaled_size(height, img_size, patch)
        try:
            logits = predict_at(size)
        except (RuntimeError, ValueError, AssertionError) as err:  # timm asserts the input size
            out.append({"img_size": list(size), "acc1": None, "loss": None,
                        "error": " ".join(str(err).split())[:200]})
            continue
        m = classification_metrics(logits, labels, num_classes)
        out.append({"img_size": list(size), "acc1": m["acc1"], "loss": m["loss"]})
    return out


def pick_one_per_class(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the first test image of each of the first ``k`` classes present (the same
    images for every arm of a comparison, which shares one test set)."""
    picked = []
    for c in torch.unique(labels).tolist():
        picked.append(int((labels == c).nonzero()[0, 0]))
        if len(picked) == k:
            break
    return torch.tensor(sorted(picked), dtype=torch.int64)


@torch.no_grad()
def attention_summary(model: nn.Module, x: torch.Tensor) -> Optional[np.ndarray]:
    """(B, gh, gw) attention of the last block over the patch grid, averaged over heads: what the
    classifier reads, the CLS token's row under ``pool=cls``, else (``pool=mean``) the mean over the
    patch rows, the attention each patch receives from the others (register tokens are neither).
    None for models without vitlab attention (timm) or 3D.

    Differential kernels give their combined map (entries may be negative; see
    :func:`vitlab.attention_maps`)."""
    from ..models.inspect import attention_maps

    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.ndim != 2:
        return None
    maps = attention_maps(model, x)
    a = maps[-1].float().mean(1)  # (B, N, N), over heads
    p = cfg.num_prefix
    rows = a[:, 0, p:] if cfg.pool == "cls" else a[:, p:, p:].mean(1)  # (B, N_patch); CLS is prefix token 0
    gh, gw = (s // q for s, q in zip(x.shape[2:], cfg.patch_size))
    return rows.reshape(-1, gh, gw).cpu().numpy().astype(np.float32)


def save_npz(path: Path, **arrays) -> None:
    """np.savez_compressed, written atomically (a reader never sees half a file)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    rundir.atomic_write_bytes(Path(path), buf.getvalue())


def load_npz(path: Path) -> Optional[dict]:
    """The arrays of ``path``, or None when the run did not record it (older runs, option off)."""
    path = Path(path)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:  # plain arrays only: nothing is executed
        return {k: f[k] for k in f.files}
