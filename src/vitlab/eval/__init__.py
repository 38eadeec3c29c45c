"""Evaluation: metrics over logits, and model cost figures."""
from .metrics import classification_metrics

__all__ = ["classification_metrics"]
