"""Training: recipe, batched augmentation, the loop, run directories."""
from .loop import train_run

__all__ = ["train_run"]
