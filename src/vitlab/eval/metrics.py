"""Classification metrics from logits, through scikit-learn's established implementations."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score


def class_probabilities(logits: torch.Tensor) -> np.ndarray:
    """Softmax probabilities in float64, for the AUROC and the ROC curves: in float32 a logit margin
    above ~17 gives exactly 1.0, so a confident right answer ties with a confidently wrong one and the
    AUROC of a confident model is understated (float64 saturates only past a margin of ~37)."""
    return torch.softmax(logits.double(), dim=1).numpy()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """acc1, acc5, mean cross-entropy, one-vs-rest AUROC (macro and per class) and the confusion
    matrix (rows = true class, columns = predicted). Undefined metrics are None: acc5 with 5 classes or
    fewer (every label is in the top 5: a perfect score by construction), the AUROC of a class absent
    from ``labels`` (or of all classes when some logits are not finite).

    Tied logits (common in bf16) rank the lower class index first, as ``argmax`` does: ``topk``
    orders ties arbitrarily, so acc1, acc5 and the confusion matrix could each break one tie
    differently."""
    logits = logits.float()
    labels = labels.long()
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    order = torch.argsort(logits, dim=1, descending=True, stable=True)
    n = max(1, len(labels))  # counts over n in float64: 27/40 is 0.675, not float32's 0.675000011920929
    acc1 = int((order[:, 0] == labels).sum()) / n
    acc5 = int((order[:, :5] == labels[:, None]).any(dim=1).sum()) / n if num_classes > 5 else None
    probs = class_probabilities(logits)
    finite = bool(np.isfinite(probs).all())
    y = labels.numpy()
    per_class = []
    for c in range(num_classes):
        positives = y == c
        if positives.all() or not positives.any() or not finite:
            per_class.append(None)
            continue
        per_class.append(float(roc_auc_score(positives, probs[:, c])))
    valid = [a for a in per_class if a is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        confusion = confusion_matrix(y, order[:, 0].numpy(), labels=list(range(num_classes))).tolist()
    return {"acc1": acc1, "acc5": acc5, "loss": loss,
            "auroc_macro": float(np.mean(valid)) if valid else None, "auroc_per_class": per_class,
            "confusion": confusion}
