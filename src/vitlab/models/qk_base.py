"""The q/k positional-encoding interface and the rotation math shared by RoPE-family PEs.

A q/k PE transforms queries and keys inside attention::

    q, k = pe(q, k, grid)      # q, k: (B, H, N, d) -> (B, H, N, d') with N = prefix + patches

Prefix tokens are never rotated: every table is built for patch tokens and padded with
identity rows by :func:`vitlab.models.positions.pad_prefix`.

A PE may also own a *position-independent* linear map of q and k (STRING's orthogonal basis P,
``q -> RoPE(x) P q``). It exposes it through :meth:`QKPE.basis`, and the attention module folds
it into the q/k projection weights once per forward instead of multiplying every token by P.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..registry import Registry
from .positions import Grid, frequency_base, pad_prefix

QK_PES: Registry[type] = Registry("q/k PE", fixed=("head_dim", "num_heads", "ndim", "layer", "depth"))


class QKPE(nn.Module):
    """Base class. Subclasses take ``(head_dim, num_heads, ndim, layer, depth, **options)``."""

    #: the kernel receives q/k of this width per head, as a multiple of head_dim
    width_factor: int = 1

    def __init__(self, *, head_dim: int, num_heads: int, ndim: int, layer: int = 0, depth: int = 1):
        super().__init__()
        self.head_dim, self.num_heads, self.ndim = head_dim, num_heads, ndim
        self.layer, self.depth = layer, depth

    def basis(self) -> Optional[torch.Tensor]:
        """A position-independent (H, d, d) map applied to q and k before :meth:`forward`, or None."""
        return None

    def forward(self, q: torch.Tensor, k: torch.Tensor, grid: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@QK_PES.register("none", "no q/k positional encoding (identity)")
class NoQKPE(QKPE):
    def forward(self, q, k, grid):
        return q, k


# ----------------------------------------------------------------------------------------------
# Rotation math (pure functions, float32).
#
# Layout: "half" pairing, pair j = channels (j, j + d/2). The sign of the rotation is folded into
# the sine table so a rotation is x * cos2 + swap_halves(x) * sin2: one copy, two multiplies and
# an add, real arithmetic only (complex tensors slow torch.compile and SDPA-friendly layouts).


def coords_dot(coords: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Angles (..., N, J) = coords (N, ndim) . freqs (..., ndim, J), in float32.

    Written as a broadcast multiply-sum, not a matmul, so autocast never runs it in bf16
    (angles like 13 * 1.0 lose whole radians in bf16)."""
    return (coords.float().unsqueeze(-1) * freqs.float().unsqueeze(-3)).sum(-2)


def rope_tables(angles: torch.Tensor, num_prefix: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables from per-pair angles.

    Args:
        angles: (..., N_patch, d/2) rotation angles in radians, float32.
        num_prefix: prefix tokens to prepend with angle 0 (no rotation).
    Returns:
        (cos2, sin2), each (..., N, d): cos2 = [cos, cos], sin2 = [-sin, sin].
    """
    angles = pad_prefix(angles.float(), num_prefix)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


class _Rotate(torch.autograd.Function):
    """out = x * cos2 + swap_halves(x) * sin2, written half by half into one output (no copy of x),
    with the matching hand-written backward: 4 fused multiply-adds each way instead of autograd's
    chain of cat/mul/add kernels (the rotation is RoPE's whole per-token cost)."""

    @staticmethod
    def forward(ctx, x, cos2, sin2):
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        out = x.new_empty(torch.broadcast_shapes(x.shape, cos2.shape))
        o1, o2 = out[..., :h], out[..., h:]
        torch.mul(x1, cos2[..., :h], out=o1).addcmul_(x2, sin2[..., :h])
        torch.mul(x2, cos2[..., h:], out=o2).addcmul_(x1, sin2[..., h:])
        ctx.save_for_backward(x, cos2, sin2)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, cos2, sin2 = ctx.saved_tensors
        h = x.shape[-1] // 2
        g1, g2 = grad[..., :h], grad[..., h:]
        gx = gcos = gsin = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(grad)
            torch.mul(g1, cos2[..., :h], out=gx[..., :h]).addcmul_(g2, sin2[..., h:])
            torch.mul(g2, cos2[..., h:], out=gx[..., h:]).addcmul_(g1, sin2[..., :h])
            gx = gx.sum_to_size(x.shape)
        if ctx.needs_input_grad[1]:
            gcos = (grad * x).sum_to_size(cos2.shape)
        if ctx.needs_input_grad[2]:
            gsin = torch.cat([g1 * x[..., h:], g2 * x[..., :h]], dim=-1).sum_to_size(sin2.shape)
        return gx, gcos, gsin


def rope_rotate(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (j, j + d/2) of x (..., N, d) by the tables of :func:`rope_tables`,
    in float32; returns x's dtype.

    Under ``torch.compile`` the same arithmetic is written as one expression, which the compiler
    fuses (with its backward) into single kernels; :class:`_Rotate`'s ``out=`` writes into views
    would break the graph at every rotation."""
    if torch.compiler.is_compiling():
        xf = x.float()
        h = xf.shape[-1] // 2
        return (xf * cos2 + torch.cat([xf[..., h:], xf[..., :h]], dim=-1) * sin2).to(x.dtype)
    return _Rotate.apply(x.float(), cos2, sin2).to(x.dtype)


def axis_pair_split(num_pairs: int, ndim: int, axis_pairs: Optional[Tuple[int, ...]] = None) -> Tuple[int, ...]:
    """How many rotation pairs each axis gets (default: an equal split; validated)."""
    if axis_pairs is None:
        if num_pairs % ndim:
            raise ValueError(f"head_dim/2 = {num_pairs} rotation pairs do not split evenly over {ndim} axes; "
                             f"use a head_dim divisible by {2 * ndim}, or set axis_pairs")
        return (num_pairs // ndim,) * ndim
    axis_pairs = tuple(int(a) for a in axis_pairs)
    if len(axis_pairs) != ndim or sum(axis_pairs) != num_pairs or min(axis_pairs) < 1:
        raise ValueError(f"axis_pairs={axis_pairs} must give {ndim} positive counts summing to "
                         f"head_dim/2 = {num_pairs}")
    return axis_pairs


def axial_frequencies(head_dim: int, ndim: int, theta: float,
                      axis_pairs: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    """(ndim, d/2) frequency matrix of axial RoPE: axis a owns a contiguous block of pairs with
    frequencies w_i = theta^(-i/n_a), i < n_a (DESIGN section 3, ``rope_axial``)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    theta = frequency_base("RoPE", "theta", theta)
    split = axis_pair_split(head_dim // 2, ndim, axis_pairs)
    freqs = torch.zeros(ndim, head_dim // 2)
    start = 0
    for axis, n in enumerate(split):
        freqs[axis, start:start + n] = theta ** (-torch.arange(n, dtype=torch.float64) / n)
        start += n
    return freqs
