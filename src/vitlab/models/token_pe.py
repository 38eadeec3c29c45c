"""Token positional encodings: ``forward(tokens, grid) -> tokens``, added to the token sequence."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..registry import Registry
from .positions import Grid, frequency_base, pad_prefix

TOKEN_PES: Registry[type] = Registry("token PE", fixed=("dim", "grid_shape", "num_prefix"))


class TokenPE(nn.Module):
    """Base class. Subclasses take ``(dim, grid_shape, num_prefix, **options)``; ``grid_shape`` is the
    patch grid the model is built for (H, W[, D])."""

    def __init__(self, *, dim: int, grid_shape: Tuple[int, ...], num_prefix: int):
        super().__init__()
        self.dim, self.grid_shape, self.num_prefix = dim, tuple(grid_shape), num_prefix

    def forward(self, tokens: torch.Tensor, grid: Grid) -> torch.Tensor:  # tokens (B, N, C)
        raise NotImplementedError


@TOKEN_PES.register("none", "no token positional encoding")
class NoTokenPE(TokenPE):
    def forward(self, tokens, grid):
        return tokens


@TOKEN_PES.register("learned", "learned absolute table over prefix + patch tokens (trunc-normal 0.02); resized bicubically")
class LearnedPE(TokenPE):
    """Learned absolute position table (ViT/DeiT APE). Options: ``pe_dropout`` (dropout on the table
    before it is added, as in clear-vit's "APE + dropout"). On another grid the patch part is
    resized by bicubic (2D) or trilinear (3D) interpolation; prefix rows are kept."""

    def __init__(self, *, dim, grid_shape, num_prefix, pe_dropout: float = 0.0):
        super().__init__(dim=dim, grid_shape=grid_shape, num_prefix=num_prefix)
        n = num_prefix + int(torch.tensor(self.grid_shape).prod())
        self.table = nn.Parameter(torch.zeros(1, n, dim))
        nn.init.trunc_normal_(self.table, std=0.02)
        self.drop = nn.Dropout(float(pe_dropout))

    def resized(self, shape: Tuple[int, ...]) -> torch.Tensor:
        if tuple(shape) == self.grid_shape:
            return self.table
        if len(shape) == 2:  # timm's own resampling (antialiased bicubic), as its ViTs resize theirs
            return resample_abs_pos_embed(self.table, list(shape), old_size=list(self.grid_shape),
                                          num_prefix_tokens=self.num_prefix)
        # volumes: timm resamples 2D tables only; trilinear (torch has no antialiased 3D interpolation)
        prefix, patch = self.table[:, :self.num_prefix], self.table[:, self.num_prefix:]
        patch = patch.reshape(1, *self.grid_shape, self.dim).movedim(-1, 1).float()  # (1, C, H, W, D)
        patch = F.interpolate(patch, size=tuple(shape), mode="trilinear", align_corners=False)
        patch = patch.to(self.table.dtype).flatten(2).transpose(1, 2)  # (1, N_patch', C)
        return torch.cat([prefix, patch], dim=1)

    def forward(self, tokens, grid):
        return tokens + self.drop(self.resized(grid.shape))


def sincos_table(coords: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed sine-cosine table (N, dim) for N-d coordinates (N, ndim): each axis gets dim/ndim
    channels, half sines and half cosines of coord * base^(-i/(dim/(2 ndim))).

    Written here because timm's ``build_sincos2d_pos_embed`` covers 2D only; this covers 2D and 3D
    with one rule (2D matches MAE/Mini-ViT: half the channels for x, half for y)."""
    ndim = coords.shape[-1]
    n = dim // (2 * ndim)
    omega = base ** (-torch.arange(n, dtype=torch.float32, device=coords.device) / n)  # (n,)
    out = coords.float().unsqueeze(-1) * omega  # (N, ndim, n)
    return torch.cat([out.sin(), out.cos()], dim=-1).flatten(1)  # (N, ndim * 2n)


@TOKEN_PES.register("sincos", "fixed 2D/3D sine-cosine table, base 10000, recomputed for any grid")
class SinCosPE(TokenPE):
    def __init__(self, *, dim, grid_shape, num_prefix, base: float = 10000.0):
        super().__init__(dim=dim, grid_shape=grid_shape, num_prefix=num_prefix)
        ndim = len(self.grid_shape)
        if dim % (2 * ndim):
            raise ValueError(f"sincos needs dim divisible by {2 * ndim} in {ndim}D, got dim={dim}")
        self.base = frequency_base("sincos", "base", base)

    def forward(self, tokens, grid):
        table = grid.cached(("sincos", self.dim, self.base),
                            lambda: pad_prefix(sincos_table(grid.coords, self.dim, self.base), grid.num_prefix))
        return tokens + table.to(tokens.dtype)


@TOKEN_PES.register("learned3d", "factorised learned 3D table: row, column, depth tables (dim/3 each) concatenated")
class Learned3DPE(TokenPE):
    """Volumetric learned PE: separate row (H), column (W) and depth (D) tables of dim/3 channels,
    concatenated channel-wise per patch. Prefix tokens get no position. On another grid each 1D
    table is resized linearly."""

    def __init__(self, *, dim, grid_shape, num_prefix):
        super().__init__(dim=dim, grid_shape=grid_shape, num_prefix=num_prefix)
        if len(self.grid_shape) != 3:
            raise ValueError(f"learned3d needs a 3D (volume) model; this model's patch grid is "
                             f"{len(self.grid_shape)}D {self.grid_shape}: use learned or sincos")
        if dim % 3:
            raise ValueError(f"learned3d splits dim into row/column/depth thirds; dim={dim} is not divisible by 3")
        self.tables = nn.ParameterList(
            [nn.Parameter(torch.randn(n, dim // 3) * 0.02) for n in self.grid_shape])  # rows, cols, depth

    def forward(self, tokens, grid):
        parts = []
        for table, n_new, n_old in zip(self.tables, grid.shape, self.grid_shape):
            if n_new != n_old:
                table = F.interpolate(table.t()[None], size=n_new, mode="linear", align_corners=False)[0].t()
            parts.append(table)
        h, w, d = (p.shape[0] for p in parts)
        pe = torch.cat([parts[0][:, None, None].expand(h, w, d, -1),
                        parts[1][None, :, None].expand(h, w, d, -1),
                        parts[2][None, None, :].expand(h, w, d, -1)], dim=-1)  # (H, W, D, C), row-major
        return tokens + pad_prefix(pe.reshape(h * w * d, self.dim), grid.num_prefix).to(tokens.dtype)
