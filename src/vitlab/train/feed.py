"""Feeding batches: in-memory uint8 tensors on the device, or files decoded by DataLoader workers.

Both yield uint8 batches (B, C, *size) and int64 labels on the training device, in the order the
trainer draws (so a run's data order depends on its seed alone, whichever feed serves it); the
batched augmentation runs after, on the device.
"""
from __future__ import annotations

import random
from typing import Iterator, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.base import ArrayDataset, FileDataset


class MemoryFeed:
    """The whole dataset as uint8 tensors on the device: a batch is one indexing op."""

    def __init__(self, ds: ArrayDataset, device: torch.device):
        self.x, self.y = ds.images.to(device), ds.labels.to(device)

    def __len__(self) -> int:
        return self.y.shape[0]

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for idx in order.to(self.x.device).split(batch_size):
            yield self.x[idx], self.y[idx]

    def sample(self, n: int) -> torch.Tensor:
        return self.x[:n]

    def spread(self, n: int) -> torch.Tensor:
        return self.x[spread_index(len(self), n).to(self.x.device)]


def spread_index(total: int, n: int) -> torch.Tensor:
    """``n`` positions evenly spaced over ``total`` items (all of them when ``n >= total``): a sample
    that covers every class of a class-ordered split in proportion, and is the same for every run."""
    if n >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, n).round().long()


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch per worker from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class StreamFeed:
    """Files decoded on demand by ``workers`` DataLoader processes, batches in the trainer's order."""

    def __init__(self, ds: FileDataset, device: torch.device, workers: int, seed: int):
        self.ds, self.device, self.workers, self.seed = ds, device, workers, seed

    def __len__(self) -> int:
        return len(self.ds)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.ds, batch_sampler=[b.tolist() for b in order.cpu().split(batch_size)],
                            num_workers=self.workers, worker_init_fn=_seed_worker,
                            generator=torch.Generator().manual_seed(self.seed),
                            pin_memory=self.device.type == "cuda", prefetch_factor=4 if self.workers else None)
        for x, y in loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def sample(self, n: int) -> torch.Tensor:
        """The first ``n`` items (normalisation statistics, probes), decoded by the workers too."""
        return self._decode(torch.arange(min(n, len(self.ds))))

    def spread(self, n: int) -> torch.Tensor:
        """``n`` items evenly spaced over the dataset (normalisation statistics)."""
        return self._decode(spread_index(len(self.ds), n))

    def _decode(self, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([x for x, _ in self.batches(idx, 256)])


def make_feed(ds, device: torch.device, workers: int = 2, seed: int = 0):
    if isinstance(ds, FileDataset):
        return StreamFeed(ds, device, workers, seed)
    return MemoryFeed(ds, device)
