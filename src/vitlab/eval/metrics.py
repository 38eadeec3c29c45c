"""Classification metrics from logits, through scikit-learn's established implementations."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """acc1, acc5, mean cross-entropy, one-vs-rest AUROC (macro and per class) and the confusion
    matrix (rows = true class, columns = predicted). AUROC of a class absent from ``labels`` is None."""
    logits = logits.float()
    labels = labels.long()
    loss = torch.nn.functional.cross_entropy(logits, labels).item()
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    n = max(1, len(labels))  # counts over n in float64: 27/40 is 0.675, not float32's 0.675000011920929
    acc1 = int((topk[:, 0] == labels).sum()) / n
    acc5 = int((topk == labels[:, None]).any(dim=1).sum()) / n
    probs = logits.softmax(dim=1).numpy().astype(np.float64)
    y = labels.numpy()
    per_class = []
    for c in range(num_classes):
        positives = y == c
        if positives.all() or not positives.any():
            per_class.append(None)
            continue
        per_class.append(float(roc_auc_score(positives, probs[:, c])))
    valid = [a for a in per_class if a is not None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        confusion = confusion_matrix(y, topk[:, 0].numpy(), labels=list(range(num_classes))).tolist()
    return {"acc1": acc1, "acc5": acc5, "loss": loss,
            "auroc_macro": float(np.mean(valid)) if valid else None, "auroc_per_class": per_class,
            "confusion": confusion}
