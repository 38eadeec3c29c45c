"""PoPE: polar-coordinate positional embedding (Gopalakrishnan et al., 2025), in 2D and 3D."""
from __future__ import annotations

import math

import torch
from torch import nn

from .positions import frequency_base, pad_prefix
from .qk_base import QK_PES, QKPE, coords_dot


_LOG2E, _LN2 = 1.4426950408889634, 0.6931471805599453


def softplus_fwd(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) = max(x, 0) + log(1 + exp(-|x|)) through exp2/log2, no autograd.

    Written out because this is PoPE's hot path and the CPU ``softplus``/``log1p`` kernels of the
    pinned torch build are ~10x slower than ``exp2``/``log2`` (BENCHMARKS.md). Absolute error
    <= 1e-6 against ``F.softplus`` (tested)."""
    t = x.abs().mul_(-_LOG2E).exp2_().add_(1.0).log2_().mul_(_LN2)
    return t.add_(x.clamp_min(0.0))


class ClampInward(torch.autograd.Function):
    """``x.clamp(lo, hi)`` whose gradient is not cut off at the bounds.

    PoPE's phase bias starts at its bound 0, where a plain clamp passes no gradient, so it would never
    learn. Passing the gradient everywhere (a straight-through clamp) lets the stored value drift out
    of range while the used one stays pinned: 300 Adam steps pushing outward left it at 3.0 where it
    acted as 0, and 318 steps the other way went by before it moved again. So outside the range only
    a gradient whose descent step leads back in passes: the stored value passes a bound by about
    what an optimiser's momentum carries (tested), and turns back at once."""

    @staticmethod
    def forward(ctx, x, lo: float, hi: float):
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        outward = ((x > ctx.hi) & (grad < 0)) | ((x < ctx.lo) & (grad > 0))  # descent: x -= lr * grad
        return grad.masked_fill(outward, 0.0), None, None


class PolarProject(torch.autograd.Function):
    """out = [softplus(x) * cos, softplus(x) * sin], (..., d) -> (..., 2d), in one pass each way.

    The reference form of PoPE's polar map (the model runs :class:`PolarEmbed`, tested equal).
    A hand-written backward (d softplus = sigmoid) replaces autograd's chain of a dozen elementwise
    kernels; ``cos``/``sin`` may broadcast against x and receive reduced gradients (PoPE's key
    tables carry the learned phase bias)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        d = x.shape[-1]
        m = softplus_fwd(x)
        out = x.new_empty(torch.broadcast_shapes(x.shape, cos.shape)[:-1] + (2 * d,))
        torch.mul(m, cos, out=out[..., :d])
        torch.mul(m, sin, out=out[..., d:])
        ctx.save_for_backward(x, m, cos, sin)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, m, cos, sin = ctx.saved_tensors
        d = x.shape[-1]
        g1, g2 = grad[..., :d], grad[..., d:]
        gx = gcos = gsin = None
        if ctx.needs_input_grad[0]:
            gx = torch.addcmul(g1 * cos, g2, sin).mul_(torch.sigmoid(x))
        if ctx.needs_input_grad[1]:
            gcos = (g1 * m).sum_to_size(cos.shape)
        if ctx.needs_input_grad[2]:
            gsin = (g2 * m).sum_to_size(sin.shape)
        return gx, gcos, gsin


def _polar(x: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
    """:class:`PolarEmbed`'s forward as one expression, for compiled graphs: the magnitude through
    exp2/log2 as there (with ``F.softplus`` instead, the inductor-compiled PoPE train step on the CPU
    of BENCHMARKS.md took 1.37x the compiled ``none`` step against 1.18x)."""
    y = x * _LOG2E
    t = torch.maximum(torch.clamp_max(y, 64.0).exp2().add(1.0).log2(), y)
    return torch.cat([t * tab[0], t * tab[1]], dim=-1)


class PolarEmbed(torch.autograd.Function):
    """PoPE's polar map of q or k, (..., d) -> (..., 2d), in few passes each way (PoPE's hot path).

    out = [t * tab[0], t * tab[1]] with t = log2(1 + e^x) = softplus(x) / ln2 and position-only
    tables tab = ln2 [cos phi, sin phi] of shape (2, ..., d), broadcasting against x. That is
    :class:`PolarProject`'s [softplus(x) cos, softplus(x) sin] (DESIGN section 3, ``pope``), with
    the ln2 moved into tables built once per grid (queries) or per layer (keys: phi + delta), so a
    magnitude costs one exp2 and one log2 (the fast CPU kernels, BENCHMARKS.md notes):

        t = max(log2(1 + 2^min(y, 64)), y),   y = x log2(e)

    The min keeps 2^y finite; beyond it (x > 44.4) log2(1 + 2^y) = y in float32 and the max picks
    y. y is staged in the output's second half, so the forward allocates only ``out`` and ``t``.

    Backward: dt/dx = sigmoid(x) / ln2, so gx = (g1 cos + g2 sin) sigmoid(x) (g1, g2: the output
    gradient's halves); the tables get sum(g1 t), sum(g2 t) over their broadcast dims (keys:
    delta learns through them). The tables must not broadcast x to a larger shape."""

    @staticmethod
    def forward(ctx, x, tab):
        d = x.shape[-1]
        out = x.new_empty(x.shape[:-1] + (2 * d,))
        y = torch.mul(x, _LOG2E, out=out[..., d:])
        t = torch.clamp_max(y, 64.0).exp2_().add_(1.0).log2_()
        torch.maximum(t, y, out=t)
        torch.mul(t, tab[0], out=out[..., :d])
        torch.mul(t, tab[1], out=out[..., d:])  # overwrites y
        ctx.save_for_backward(x, t if ctx.needs_input_grad[1] else None, tab)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, t, tab = ctx.saved_tensors
        d = x.shape[-1]
        g1, g2 = grad[..., :d], grad[..., d:]
        gx = gtab = None
        if ctx.needs_input_grad[0]:
            cs = tab * (1.0 / _LN2)  # [cos, sin]: d(t ln2)/dx = sigmoid(x)
            gx = torch.mul(g1, cs[0]).addcmul_(g2, cs[1]).mul_(torch.sigmoid(x))
        if ctx.needs_input_grad[1]:
            lead = tuple(range(x.dim() - tab.dim() + 1))  # dims of x the tables do not have

            def reduce(g):
                g = torch.mul(g, t)
                return (g.sum(lead) if lead else g).sum_to_size(tab.shape[1:])

            gtab = torch.stack([reduce(g1), reduce(g2)])
        return gx, gtab


@QK_PES.register("pope", "PoPE: softplus magnitudes, position-only phases, learned key phase bias; q/k twice as wide")
class PoPE(QKPE):
    """Polar positional embedding.

    Channel c of a head becomes a magnitude m = softplus(q_c) and a phase phi_c = p * theta_c
    that depends on position only; query -> (m cos phi, m sin phi), key ->
    (m cos(phi + delta), m sin(phi + delta)), so the score is

        sum_c m_q m_k cos((p_q - p_k) theta_c - delta_c)

    (content in the magnitude, position in the angle). The d channels split evenly between the
    axes; within an axis of n channels, theta_i = base^(-i/n) — the paper's 1D rule
    base^(-c/d) with d frequencies, not d/2 as in RoPE, applied per axis as ``rope_axial`` does.
    delta is learned per head and channel, initialised at 0 and clamped to [-2 pi, 0] (:class:`ClampInward`).
    Prefix tokens get phase 0 and no bias (magnitudes only).

    q and k come out 2d wide: the attention module passes the softmax scale 1/sqrt(d) of the
    original d explicitly. Options: ``base`` (default 100, the same base as ``rope_axial``).
    """

    width_factor = 2

    def __init__(self, *, head_dim, num_heads, ndim, layer=0, depth=1, base: float = 100.0):
        super().__init__(head_dim=head_dim, num_heads=num_heads, ndim=ndim, layer=layer, depth=depth)
        if head_dim % ndim:
            raise ValueError(f"pope needs head_dim divisible by {ndim} in {ndim}D, got {head_dim}")
        self.base = frequency_base("pope", "base", base)
        n = head_dim // ndim
        freqs = torch.zeros(ndim, head_dim)
        for axis in range(ndim):
            freqs[axis, axis * n:(axis + 1) * n] = float(base) ** (-torch.arange(n, dtype=torch.float64) / n)
        self.register_buffer("freqs", freqs, persistent=False)  # (ndim, d)
        self.delta = nn.Parameter(torch.zeros(num_heads, 1, head_dim))  # (H, 1, d) phase bias

    def phases(self, grid):
        return grid.cached(("pope", self.head_dim, self.base),
                           lambda: coords_dot(grid.coords, self.freqs))  # (N_patch, d), float32

    def query_tables(self, grid):
        """ln2 [cos phi, sin phi], (2, N, d) float32, for :class:`PolarEmbed`: position only, so built
        once per grid and shared by every layer (prefix rows: phase 0)."""
        def build():
            phi = pad_prefix(self.phases(grid), grid.num_prefix)
            return torch.stack([phi.cos(), phi.sin()]).mul_(_LN2)

        return grid.cached(("pope-query", self.head_dim, self.base), build)

    def forward(self, q, k, grid):
        dtype = q.dtype
        phi = self.phases(grid)
        delta = ClampInward.apply(self.delta.float(), -2 * math.pi, 0.0)  # (H, 1, d)
        phi_k = pad_prefix(phi + delta, grid.num_prefix)  # (H, N, d)
        tab_q, tab_k = self.query_tables(grid), torch.stack([phi_k.cos(), phi_k.sin()]) * _LN2  # (2, H, N, d)
        # Compiled: the same arithmetic as one expression, which the compiler fuses (PolarEmbed's
        # out= writes into views would break the graph).
        polar = _polar if torch.compiler.is_compiling() else PolarEmbed.apply
        q = polar(q.float(), tab_q)  # (B, H, N, 2d)
        k = polar(k.float(), tab_k)
        return q.to(dtype), k.to(dtype)
