"""Multi-head self-attention: qkv -> [q/k PE] -> kernel -> proj.

The module receives its q/k PE and its kernel at construction and never asks which they are.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import Kernel
from .positions import Grid
from .qk_base import QKPE


def fold_basis(weight: torch.Tensor, bias: Optional[torch.Tensor], basis: torch.Tensor, num_heads: int):
    """Apply a per-head (H, d, d) map P to the q and k rows of a fused (3C, C) qkv projection.

    Since P q = P (W_q x + b_q) = (P W_q) x + P b_q, mapping the weights is the same as mapping every
    token's q and k, at the cost of one (H, d, d) x (H, d, C) product instead of one per token.
    """
    c = weight.shape[1]
    d = c // num_heads
    w_qk = weight[: 2 * c].reshape(2, num_heads, d, c)
    w_qk = torch.matmul(basis.to(weight.dtype), w_qk)  # (2, H, d, C)
    weight = torch.cat([w_qk.reshape(2 * c, c), weight[2 * c:]], dim=0)
    if bias is not None:
        b_qk = torch.matmul(basis.to(bias.dtype), bias[: 2 * c].reshape(2, num_heads, d, 1))
        bias = torch.cat([b_qk.reshape(2 * c), bias[2 * c:]], dim=0)
    return weight, bias


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, *, qk_pe: QKPE, kernel: Kernel, qkv_bias: bool = True,
                 proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5  # of the original head dim, even if the PE widens q/k
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.qk_pe = qk_pe
        self.kernel = kernel
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.record: Optional[List[torch.Tensor]] = None  # set by vitlab.attention_maps

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        b, n, c = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        basis = self.qk_pe.basis()
        if basis is not None:
            weight, bias = fold_basis(weight, bias, basis, self.num_heads)
        qkv = F.linear(x, weight, bias).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, d)
        q, k = self.qk_pe(q, k, grid)  # (B, H, N, d) or (B, H, N, 2d) for PoPE
        if self.record is not None:
            self.record.append(self.kernel.probs(q, k, self.scale, grid).detach())
        o = self.kernel(q, k, v, self.scale, grid)  # (B, H', N, d')
        o = o.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(o))
