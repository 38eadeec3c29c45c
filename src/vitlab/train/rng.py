"""The global random generators a run draws from (Python's, NumPy's, torch's CPU and CUDA ones):
seeding, their state as plain data for checkpoints, and private streams for code that can only
draw from them."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG a run draws from, as plain data (loadable with ``weights_only=True``)."""
    py = random.getstate()
    npst = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PrivateStream:
    """A stream of the global generators of its own, seeded once: code run under :meth:`use` draws
    from it, and the generators everything else draws from are left as they were. For library code
    that takes no generator argument (torchvision's AutoAugment/RandAugment, timm's RandomErasing
    and Mixup): what it draws then no longer depends on what else drew from the global generators in
    between (a model's dropout, say)."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.state: Optional[dict] = None  # rng_state() format; made on first use

    @contextmanager
    def use(self) -> Iterator[None]:
        outside = rng_state()
        try:
            if self.state is None:
                seed_everything(self.seed)
            else:
                set_rng_state(self.state)
            yield
            self.state = rng_state()
        finally:
            set_rng_state(outside)
