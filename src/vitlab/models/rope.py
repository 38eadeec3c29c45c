"""RoPE for images: axial (fixed frequencies per axis) and mixed (learned 2D/3D frequencies)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .positions import Grid, frequency_base
from .qk_base import QK_PES, QKPE, axial_frequencies, axis_pair_split, coords_dot, rope_rotate, rope_tables


@QK_PES.register("rope_axial", "RoPE-Axial: pairs split between axes, angle = coord * theta^(-i/n) (theta 100)")
class RopeAxial(QKPE):
    """Axial RoPE (Heo et al., 2024). Pair j of axis a rotates by ``coord_a * theta^(-i/n_a)``.

    Options: ``theta`` (base, default 100), ``axis_pairs`` (pairs per axis, default an even split;
    controls which channels encode which axis).
    """

    def __init__(self, *, head_dim, num_heads, ndim, layer=0, depth=1,
                 theta: float = 100.0, axis_pairs: Optional[Tuple[int, ...]] = None):
        super().__init__(head_dim=head_dim, num_heads=num_heads, ndim=ndim, layer=layer, depth=depth)
        freqs = axial_frequencies(head_dim, ndim, theta, axis_pairs)  # validates head_dim, theta and the split
        self.theta = float(theta)
        self.axis_pairs = axis_pair_split(head_dim // 2, ndim, axis_pairs)
        self.register_buffer("freqs", freqs, persistent=False)

    def tables(self, grid: Grid):
        # Same for every layer and head: built once per grid and shared through the grid's cache.
        return grid.cached(("rope_axial", self.head_dim, self.theta, self.axis_pairs),  # (N, d) each
                           lambda: rope_tables(coords_dot(grid.coords, self.freqs), grid.num_prefix))

    def forward(self, q, k, grid):
        cos2, sin2 = self.tables(grid)
        return rope_rotate(q, cos2, sin2), rope_rotate(k, cos2, sin2)


def mixed_init(head_dim: int, num_heads: int, ndim: int, theta: float, generator=None) -> torch.Tensor:
    """RoPE-Mixed initial frequencies, (H, ndim, d/2).

    2D (Heo et al., 2024, and timm's ``init_random_2d_freqs``): per head draw phi ~ U(0, 2 pi);
    pairs j < d/4 get magnitude theta^(-4j/d) in direction phi, pairs j >= d/4 the same
    magnitudes in direction phi + pi/2. 3D generalises "two orthogonal directions" to a random
    orthonormal frame per head: pair group g (d/6 pairs each) points along the frame's axis g, so
    z frequencies are never initialised at zero.
    """
    n = axis_pair_split(head_dim // 2, ndim)[0]
    mag = theta ** (-torch.arange(n, dtype=torch.float32) / n)  # (n,) = theta^(-4j/d) in 2D
    if ndim == 2:
        phi = torch.rand(num_heads, 1, generator=generator) * 2 * math.pi
        dirs = torch.stack([torch.cat([phi.cos(), (phi + math.pi / 2).cos()], -1),
                            torch.cat([phi.sin(), (phi + math.pi / 2).sin()], -1)], dim=1)  # (H, ndim, groups)
    else:
        a = torch.randn(num_heads, ndim, ndim, generator=generator)
        qmat, r = torch.linalg.qr(a)
        dirs = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # (H, ndim, groups)
    # (H, ndim, groups, n) -> (H, ndim, d/2): group g owns pairs [g*n, (g+1)*n)
    return (dirs.unsqueeze(-1) * mag).flatten(-2)


@QK_PES.register("rope_mixed", "RoPE-Mixed: learned per-layer, per-head frequencies, angle = x f_x + y f_y")
class RopeMixed(QKPE):
    """RoPE-Mixed (Heo et al., 2024): pair j rotates by sum_a coord_a * f[h, a, j], f learned per
    layer and head, kept in float32 and out of weight decay. The angle stays linear in position,
    so attention stays relative. Option: ``theta`` (default 10, as in the paper)."""

    def __init__(self, *, head_dim, num_heads, ndim, layer=0, depth=1, theta: float = 10.0):
        super().__init__(head_dim=head_dim, num_heads=num_heads, ndim=ndim, layer=layer, depth=depth)
        if head_dim % (2 * ndim):
            raise ValueError(f"rope_mixed needs head_dim divisible by {2 * ndim} in {ndim}D, got {head_dim}")
        theta = frequency_base("rope_mixed", "theta", theta)
        self.freqs = nn.Parameter(mixed_init(head_dim, num_heads, ndim, theta))  # (H, ndim, d/2)

    def forward(self, q, k, grid):
        angles = coords_dot(grid.coords, self.freqs)  # (H, N_patch, d/2)
        cos2, sin2 = rope_tables(angles, grid.num_prefix)  # (H, N, d)
        return rope_rotate(q, cos2, sin2), rope_rotate(k, cos2, sin2)
