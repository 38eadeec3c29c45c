"""Token positions: prefix tokens first (by count), then patch tokens with grid coordinates.

Coordinates, not indices: a patch at row r, column c (and depth slice s) has coordinates
(x, y[, z]) = (c, r[, s]) in patch units. Patch tokens are flattened row-major over the grid
(H, W[, D]), which is the order ``Conv2d/Conv3d(...).flatten(2)`` produces. A new image size is
just a new grid: relative PEs read the new coordinates, nothing else changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Tuple

import torch


@dataclass(frozen=True, eq=False)
class Grid:
    """Where every token sits.

    Attributes:
        shape: patch grid (H, W) or (H, W, D), in patches.
        num_prefix: number of prefix tokens (CLS, registers) that precede the patch tokens.
        coords: (H*W[*D], ndim) float32 patch coordinates, columns (x, y[, z]).
    """

    shape: Tuple[int, ...]
    num_prefix: int
    coords: torch.Tensor = field(repr=False)
    #: position tables that depend only on the grid (RoPE's cos/sin, sincos tables), built once
    cache: dict = field(default_factory=dict, repr=False)

    def cached(self, key, build):
        """``cache[key]``, built by ``build()`` on first use. Built outside inference mode: a table
        first made under ``torch.inference_mode()`` (say an evaluation before training) would be an
        inference tensor, which autograd refuses to save when the model later trains."""
        if key not in self.cache:
            with torch.inference_mode(False):
                self.cache[key] = build()
        return self.cache[key]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def num_patches(self) -> int:
        return self.coords.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches


def frequency_base(owner: str, name: str, value) -> float:
    """A PE's frequency base (RoPE's theta, PoPE's and sin-cos's base) as a float, checked: frequencies
    base^(-i/n) are NaN for a negative base and zero or constant for 0 and 1, which would only show
    as a loss that is not finite at the first step."""
    try:
        base = float(value)
    except (TypeError, ValueError):
        base = float("nan")
    if not (base > 1 and math.isfinite(base)):
        raise ValueError(f"{owner} {name} must be a finite number > 1, got {value!r}")
    return base


def grid_coords(shape: Tuple[int, ...], device=None) -> torch.Tensor:
    """(prod(shape), ndim) coordinates (x, y[, z]) for a row-major (H, W[, D]) patch grid."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")  # each (H, W[, D]); mesh[0] = row = y
    rows, cols = mesh[0].reshape(-1), mesh[1].reshape(-1)
    out = [cols, rows]  # x = column, y = row
    if len(shape) == 3:
        out.append(mesh[2].reshape(-1))  # z = depth slice
    return torch.stack(out, dim=-1)


def make_grid(shape: Tuple[int, ...], num_prefix: int, device=None) -> Grid:
    with torch.inference_mode(False):  # grids are cached across calls: see Grid.cached
        return Grid(tuple(int(s) for s in shape), int(num_prefix), grid_coords(tuple(shape), device=device))


def pad_prefix(table: torch.Tensor, num_prefix: int, value: float = 0.0) -> torch.Tensor:
    """Prepend ``num_prefix`` rows of ``value`` along dim -2 of a (..., N_patch, C) table.

    Prefix tokens are handled here, in one place: a q/k PE builds its tables for patch tokens
    and pads them with identity rows (angle 0), so the rotation runs over all tokens at once
    and leaves CLS/register tokens untouched.
    """
    if num_prefix == 0:
        return table
    pad = table.new_full(table.shape[:-2] + (num_prefix, table.shape[-1]), value)
    return torch.cat([pad, table], dim=-2)
