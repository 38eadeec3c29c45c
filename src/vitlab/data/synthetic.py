"""A seeded synthetic source for tests: each class is a bright bar with a class-specific position and
orientation, plus noise, in 2D images or 3D volumes."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .base import DATASETS, ArrayDataset, DataBundle, int_sizes

# Shape constants in normalised coordinates ([-1, 1] across the image): the bar's centre sits on a
# ring of radius 0.4 (inside the image for any angle), its Gaussian cross-section has sigma 0.12
# (about one pixel at 16 px) and its length is 0.9 (half the image), so both cues survive at 16 px.
RING, WIDTH, LENGTH, EDGE = 0.4, 0.12, 0.9, 0.05
JITTER_POS, NOISE, BACKGROUND = 0.06, 0.08, 0.1


def _fibonacci(n: int, hemisphere: bool) -> torch.Tensor:
    """n well-spread unit vectors (n, 3) on the sphere (or the upper hemisphere: directions mod sign)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - i / n if hemisphere else 1 - 2 * i / n
    r = torch.sqrt((1 - z * z).clamp_min(0))
    phi = math.pi * (3 - math.sqrt(5)) * i  # the golden angle
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], 1).float()


def class_geometry(num_classes: int, ndim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(centres (K, ndim), unit directions (K, ndim)) of each class's bar."""
    k = torch.arange(num_classes, dtype=torch.float64)
    if ndim == 2:
        centres = RING * torch.stack([torch.cos(2 * math.pi * k / num_classes),
                                      torch.sin(2 * math.pi * k / num_classes)], 1)
        angle = math.pi * k / num_classes  # orientations mod 180 degrees
        return centres.float(), torch.stack([torch.cos(angle), torch.sin(angle)], 1).float()
    return RING * _fibonacci(num_classes, False), _fibonacci(num_classes, True)


def render(labels: torch.Tensor, size: Tuple[int, ...], channels: int, num_classes: int,
           gen: torch.Generator) -> torch.Tensor:
    """uint8 (N, C, *size) images of the given labels."""
    ndim, n = len(size), len(labels)
    centres, dirs = class_geometry(num_classes, ndim)
    axes = [torch.linspace(-1 + 1 / s, 1 - 1 / s, s) for s in size]  # pixel centres
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # (*size, ndim)
    centre = centres[labels] + JITTER_POS * torch.randn(n, ndim, generator=gen)  # (N, ndim)
    u = dirs[labels] + 0.15 / max(num_classes, 1) * torch.randn(n, ndim, generator=gen)
    u = u / u.norm(dim=1, keepdim=True)  # (N, ndim): orientation jitter of a few degrees
    amp = 0.6 + 0.4 * torch.rand(n, generator=gen)
    d = grid.reshape(1, -1, ndim) - centre[:, None]  # (N, P, ndim) offsets from the bar centre
    along = (d * u[:, None]).sum(-1)  # (N, P)
    perp2 = (d - along[..., None] * u[:, None]).pow(2).sum(-1)
    bar = torch.exp(-perp2 / (2 * WIDTH ** 2)) * torch.sigmoid((LENGTH / 2 - along.abs()) / EDGE)
    img = BACKGROUND + amp[:, None] * bar  # (N, P)
    img = img[:, None] + NOISE * torch.randn(n, channels, img.shape[1], generator=gen)  # (N, C, P)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).reshape(n, channels, *size)


def check_options(*, num_classes, img_size, channels, n_train, n_test) -> Tuple[int, ...]:
    """The synthetic options' values (one-line ValueErrors); returns the image size as a tuple."""
    size = int_sizes(img_size, (2, 3), low=4, square=True)
    if size is None:
        raise ValueError(f"synthetic option img_size={img_size!r}; expected an int >= 4, (H, W) or (H, W, D)")
    for key, value, low in (("num_classes", num_classes, 2), ("channels", channels, 1),
                            ("n_train", n_train, 1), ("n_test", n_test, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"synthetic option {key}={value!r}; expected an int >= {low}")
    return size


@DATASETS.register("synthetic", "seeded class-dependent bars (position + orientation) in noise, 2D or 3D, for tests",
                   check=check_options, size=check_options)
def synthetic(root: Optional[str], seed: int, *, num_classes: int = 4,
              img_size: Union[int, Tuple[int, ...]] = 16, channels: int = 1, n_train: int = 512,
              n_test: int = 128) -> DataBundle:
    """Options: ``num_classes``, ``img_size`` (int, (H, W), or (H, W, D) for volumes), ``channels``,
    ``n_train``, ``n_test``. ``load_dataset``'s ``seed`` fixes every pixel. Classes are balanced."""
    size = check_options(num_classes=num_classes, img_size=img_size, channels=channels, n_train=n_train,
                         n_test=n_test)
    gen = torch.Generator().manual_seed(int(seed))
    classes = [f"class{k}" for k in range(num_classes)]
    parts = []
    for n in (n_train, n_test):
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        parts.append(ArrayDataset(render(labels, size, channels, num_classes, gen), labels, classes, "synthetic"))
    return DataBundle(parts[0], parts[1] if n_test else None, "synthetic")
