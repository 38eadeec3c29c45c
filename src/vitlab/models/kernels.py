"""Attention kernels: how scores become an output once q/k carry their positional encoding.

Interface (``q, k``: (B, H, N, dq); ``v``: (B, H, N, d); ``scale`` passed explicitly because a q/k PE
may change the q/k width, as PoPE does)::

    out = kernel(q, k, v, scale, grid)     # (B, H', N, d') with H' * d' = H * d
    a   = kernel.probs(q, k, scale, grid)  # (B, H', N, N) post-softmax map, eager arithmetic

``probs`` is what :func:`vitlab.attention_maps` records, whatever path ``forward`` takes.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry
from .positions import Grid

KERNELS: Registry[type] = Registry("attention kernel", fixed=("head_dim", "num_heads", "ndim", "layer", "depth", "attn_drop"))
log = logging.getLogger("vitlab.attention")


class Kernel(nn.Module):
    """Softmax attention written out: scores -> softmax -> weighted sum. Subclasses change
    :meth:`scores` (what is compared) or :meth:`forward` (a fused path with the same arithmetic)."""

    def __init__(self, *, head_dim: int, num_heads: int, ndim: int, layer: int = 0, depth: int = 1,
                 attn_drop: float = 0.0):
        super().__init__()
        self.head_dim, self.num_heads, self.ndim, self.layer = head_dim, num_heads, ndim, layer
        self.attn_drop = float(attn_drop)

    def scores(self, q, k, scale: float, grid: Grid) -> torch.Tensor:
        return scaled_scores(q, k, scale)  # (B, H, N, N)

    def probs(self, q, k, scale: float, grid: Grid) -> torch.Tensor:
        return self.scores(q, k, scale, grid).softmax(dim=-1)

    def eager(self, q, k, v, scale, grid) -> torch.Tensor:
        a = F.dropout(self.probs(q, k, scale, grid), self.attn_drop, self.training)
        return a @ v.to(a.dtype)

    def forward(self, q, k, v, scale: float, grid: Grid) -> torch.Tensor:
        return self.eager(q, k, v, scale, grid)


def scaled_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, N, dq) x (B, H, M, dq) -> (B, H, N, M) = q k^T * scale, as one batched GEMM with the
    scale fused in (alpha) instead of a matmul and a multiply."""
    b, h, n, d = q.shape
    s = torch.baddbmm(q.new_empty(()).expand(b * h, n, k.shape[2]), q.reshape(b * h, n, d),
                      k.reshape(b * h, -1, d).transpose(1, 2), beta=0.0, alpha=scale)
    return s.view(b, h, n, -1)


def fused_route(device_type: str, dtype: torch.dtype, qk_dim: int, v_dim: int) -> bool:
    """Whether :func:`sdpa` hands q/k/v to torch's fused ``scaled_dot_product_attention``.

    Always on CUDA: with bf16/fp16 q/k/v (autocast) torch picks its flash kernel when q/k and v
    have the same head dim and the memory-efficient one when q/k are wider (PoPE; that kernel only
    needs the q/k widths equal and every width a multiple of 8 in half precision). On CPU only
    in fp32 with equal widths: there the written-out arithmetic is faster (measured on the CPU
    of BENCHMARKS.md, forward + backward, (128, 4, 65, 48): bf16 flash 42 ms against 7 ms
    written out; with q/k wider than v torch falls back to a slower math path)."""
    if device_type == "cpu":
        return dtype == torch.float32 and qk_dim == v_dim
    return True


class _SoftmaxAttention(torch.autograd.Function):
    """softmax(scale q k^T) v for (B, H, N, dq) q/k and (B, H, M, dv) v, written out with a
    hand-written backward: the route when q/k and v widths differ (PoPE's 2d-wide q/k) on CPU.

    Against autograd over the same three ops it saves the backward's two full passes of
    ``* scale`` over the 2d-wide q/k gradients (the scale rides in the GEMMs' alpha each way),
    returns the key gradient in k's layout rather than transposed, and runs the softmax backward
    in place (the forward softmax not: out= aliasing its input took 1.2 ms against 0.7 ms on the
    (512, 65, 65) scores). Same arithmetic, same dtypes; first-order gradients only (nothing in
    vitlab differentiates twice)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        b, h, n, dq = q.shape
        m, dv = k.shape[2], v.shape[-1]
        qf, kf = q.reshape(b * h, n, dq), k.reshape(b * h, m, dq)
        s = torch.baddbmm(qf.new_empty(()).expand(b * h, n, m), qf, kf.transpose(1, 2), beta=0.0, alpha=scale)
        p = s.softmax(dim=-1)
        vf = v.reshape(b * h, m, dv).to(p.dtype)
        ctx.save_for_backward(qf, kf, vf, p)
        ctx.scale, ctx.v_dtype = scale, v.dtype
        return torch.bmm(p, vf).view(b, h, n, dv)

    @staticmethod
    def backward(ctx, go):
        qf, kf, vf, p = ctx.saved_tensors
        b, h, n, dv = go.shape
        gof = go.reshape(b * h, n, dv).to(p.dtype)
        gq = gk = gv = None
        if ctx.needs_input_grad[2]:
            gv = torch.bmm(p.transpose(1, 2), gof).view(b, h, -1, dv).to(ctx.v_dtype)
        gs = torch.bmm(gof, vf.transpose(1, 2))  # dL/dp, then dL/ds in place
        gs = torch._softmax_backward_data(gs, p, -1, p.dtype, grad_input=gs)
        empty = gs.new_empty(())
        if ctx.needs_input_grad[0]:
            gq = torch.baddbmm(empty.expand(qf.shape), gs, kf, beta=0.0, alpha=ctx.scale).view(b, h, n, -1)
        if ctx.needs_input_grad[1]:
            gk = torch.baddbmm(empty.expand(kf.shape), gs.transpose(1, 2), qf, beta=0.0,
                               alpha=ctx.scale).view(b, h, -1, kf.shape[-1])
        return gq, gk, gv, None


def sdpa(q, k, v, scale: float, dropout: float, training: bool) -> torch.Tensor:
    """Softmax attention by the fastest correct route (:func:`fused_route`)."""
    if not fused_route(q.device.type, q.dtype, q.shape[-1], v.shape[-1]):
        if q.shape[-1] != v.shape[-1] and not (dropout and training) and q.dim() == 4:
            # PoPE, eager or compiled: traced by torch.compile too (no graph break), where it beat the
            # plain ops inductor generates (BENCHMARKS.md, torch.compile on CPU)
            return _SoftmaxAttention.apply(q, k, v, scale)
        a = F.dropout(scaled_scores(q, k, scale).softmax(dim=-1), dropout, training)
        return a @ v.to(a.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout if training else 0.0, scale=scale)


@KERNELS.register("standard", "softmax attention through torch's scaled_dot_product_attention (fused kernels)")
class Standard(Kernel):
    def forward(self, q, k, v, scale, grid):
        return sdpa(q, k, v, scale, self.attn_drop, self.training)


@KERNELS.register("eager", "the same arithmetic written out; can verify its maps and log Q/K/V/A/O shapes")
class Eager(Kernel):
    """Options: ``check`` (raise if an attention row does not sum to 1 within 1e-4, or within the
    maps' dtype's epsilon where that is coarser: a row of bf16 probabilities, each rounded by up to
    eps/2 of itself, sums to 1 within eps/2), ``log_shapes`` (log the shapes of Q, K, V, A, O at INFO
    on logger ``vitlab.attention``)."""

    def __init__(self, *, head_dim, num_heads, ndim, layer=0, depth=1, attn_drop=0.0,
                 check: bool = False, log_shapes: bool = False):
        super().__init__(head_dim=head_dim, num_heads=num_heads, ndim=ndim, layer=layer, depth=depth,
                         attn_drop=attn_drop)
        self.check, self.log_shapes = check, log_shapes  # (bools: the registry refuses anything else)

    def forward(self, q, k, v, scale, grid):
        a = self.probs(q, k, scale, grid)
        if self.check:
            err = (a.float().sum(-1) - 1).abs().max().item()
            tol = max(1e-4, torch.finfo(a.dtype).eps)
            if not err <= tol:  # (NaN too)
                raise RuntimeError(f"layer {self.layer}: attention rows sum to 1 +- {err:.2e} (> {tol:.0e}, {a.dtype})")
        o = F.dropout(a, self.attn_drop, self.training) @ v.to(a.dtype)
        if self.log_shapes:
            log.info("layer %d: Q %s K %s V %s A %s O %s", self.layer, *(tuple(t.shape) for t in (q, k, v, a, o)))
        return o


@KERNELS.register("differential", "Differential Transformer: softmax(Q1K1) - lambda softmax(Q2K2), half the heads")
class Differential(Kernel):
    """Differential attention (Ye et al., 2024), with the reference code's shapes: the H heads of
    q/k pair up into H/2 differential heads (sub-heads 2h and 2h+1 are Q1/K1 and Q2/K2), each with
    a value 2d wide, so parameters match ``standard``::

        A = softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))
        lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,
        lambda_init = 0.8 - 0.6 exp(-0.3 (layer - 1))      (layer counted from 1)

    then a per-head RMS norm of A V scaled by (1 - lambda_init). The maps returned by
    :meth:`probs` are this combined A, (B, H/2, N, N): rows sum to 1 - lambda, entries may be negative.
    """

    def __init__(self, *, head_dim, num_heads, ndim, layer=0, depth=1, attn_drop=0.0):
        super().__init__(head_dim=head_dim, num_heads=num_heads, ndim=ndim, layer=layer, depth=depth,
                         attn_drop=attn_drop)
        if num_heads % 2:
            raise ValueError(f"{type(self).__name__.lower()} attention pairs heads into differential heads; "
                             f"heads={num_heads} is odd, use an even number")
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer)  # layer is 0-based here
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(head_dim) * 0.1) for _ in range(4))
        self.sub_norm = nn.RMSNorm(2 * head_dim, eps=1e-5)

    def lam(self) -> torch.Tensor:
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum().float())
                - torch.exp((self.lambda_q2 * self.lambda_k2).sum().float()) + self.lambda_init)

    @staticmethod
    def pair(x: torch.Tensor):
        """(B, H, N, d) -> two (B, H/2, N, d) halves: sub-heads 2h and 2h+1."""
        return x.unflatten(1, (x.shape[1] // 2, 2)).unbind(2)

    @staticmethod
    def wide_values(v: torch.Tensor) -> torch.Tensor:
        """(B, H, N, d) -> (B, H/2, N, 2d): differential head h owns channels of sub-heads 2h, 2h+1."""
        b, h, n, d = v.shape
        return v.transpose(1, 2).reshape(b, n, h // 2, 2 * d).transpose(1, 2)

    def combine(self, a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
        return a1 - self.lam().to(a1.dtype) * a2

    def probs(self, q, k, scale, grid):
        a = super().probs(q, k, scale, grid)  # (B, H, N, N): both halves at once
        a1, a2 = self.pair(a)
        return self.combine(a1, a2)

    def finish(self, o: torch.Tensor) -> torch.Tensor:
        # in float32 like autocast's LayerNorm: a bf16 input with the float32 weight misses torch's
        # fused RMSNorm and normalises in reduced precision
        return self.sub_norm(o.float()).to(o.dtype) * (1 - self.lambda_init)

    def forward(self, q, k, v, scale, grid):
        (q1, q2), (k1, k2), v = self.pair(q), self.pair(k), self.wide_values(v)
        lam = self.lam().to(q.dtype)
        o = (sdpa(q1, k1, v, scale, self.attn_drop, self.training)
             - lam * sdpa(q2, k2, v, scale, self.attn_drop, self.training))
        return self.finish(o)


@KERNELS.register("differential_entropy", "differential attention with a per-query lambda that grows with the entropy of its second map")
class DifferentialEntropy(Differential):
    """As ``differential``, but lambda depends on the query (clear-vit's entropy-modulated variant)::

        h_i = H(A2_i) / log N_keys,   H(p) = -sum_j p_j log p_j      (normalised entropy in [0, 1])
        lambda_i = 2 h_i * lambda

    A query whose second map is diffuse (h_i -> 1) subtracts up to 2 lambda of it; a sharp one
    (h_i -> 0) keeps its first map; at h_i = 1/2 it equals ``differential``.
    """

    def combine(self, a1, a2):
        entropy = -(a2 * torch.log(a2.clamp_min(1e-12))).sum(-1, keepdim=True)  # (B, H/2, N, 1)
        h = entropy / math.log(a2.shape[-1]) if a2.shape[-1] > 1 else torch.zeros_like(entropy)  # one key: no spread
        return a1 - 2 * h * self.lam().to(a1.dtype) * a2

    def forward(self, q, k, v, scale, grid):
        a = F.dropout(self.probs(q, k, scale, grid), self.attn_drop, self.training)
        return self.finish(a @ self.wide_values(v).to(a.dtype))


@KERNELS.register("suppression", "spatial surround suppression: scores minus a learned depthwise conv of the score map")
class Suppression(Kernel):
    """Each query's scores over the patch grid, seen as a 2D (3D) map, minus a learned depthwise
    ``kernel_size`` convolution of that map (one kernel per head, initialised at zero so training
    starts from standard attention). Scores on prefix keys are not convolved."""

    def __init__(self, *, head_dim, num_heads, ndim, layer=0, depth=1, attn_drop=0.0, kernel_size: int = 3):
        super().__init__(head_dim=head_dim, num_heads=num_heads, ndim=ndim, layer=layer, depth=depth,
                         attn_drop=attn_drop)
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ValueError(f"suppression kernel_size must be a positive odd number, got {kernel_size}")
        self.weight = nn.Parameter(torch.zeros(num_heads, 1, *(int(kernel_size),) * ndim))

    def scores(self, q, k, scale, grid):
        s = super().scores(q, k, scale, grid)  # (B, H, N, N)
        b, h, n, _ = s.shape
        p = grid.num_prefix
        maps = s[..., p:].transpose(1, 2).reshape(b * n, h, *grid.shape)  # (B*N, H, gh, gw[, gd])
        conv = F.conv2d if grid.ndim == 2 else F.conv3d
        surround = conv(maps, self.weight.to(maps.dtype), padding=self.weight.shape[-1] // 2, groups=h)
        surround = surround.reshape(b, n, h, -1).transpose(1, 2)  # (B, H, N, N_patch)
        return torch.cat([s[..., :p], s[..., p:] - surround], dim=-1)


def raster_diff(x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """dX_i = X_i - X_{i-1} over patch tokens in raster order; the first patch and prefix tokens keep
    their raw vectors. x: (B, H, N, d)."""
    p = num_prefix
    return torch.cat([x[:, :, :p + 1], x[:, :, p + 1:] - x[:, :, p:-1]], dim=2)


@KERNELS.register("diffsim", "difference similarity: scores between raster-order differences of q and of k")
class DiffSim(Kernel):
    """Scores from dQ_i = Q_i - Q_{i-1} and dK_j = K_j - K_{j-1} (raster order over patch tokens,
    after the q/k PE); values unchanged. Fused through SDPA."""

    def scores(self, q, k, scale, grid):
        return super().scores(raster_diff(q, grid.num_prefix), raster_diff(k, grid.num_prefix), scale, grid)

    def forward(self, q, k, v, scale, grid):
        p = grid.num_prefix
        return sdpa(raster_diff(q, p), raster_diff(k, p), v, scale, self.attn_drop, self.training)
