"""STRING (Schenck et al., ICML 2025): a learned orthogonal basis change P, then RoPE.

    q -> RoPE(x, y) P q,     k -> RoPE(x, y) P k

P is shared by all positions, so scores stay relative: (R_i P q)^T (R_j P k) = q^T P^T R_{j-i} P k.
Because P does not depend on position, vitlab never multiplies tokens by it: the attention module
folds P into the q/k projection weights once per forward (one d x d map per head), so training
costs RoPE plus a (H, d, d) solve, and :func:`vitlab.fold_string` makes the fold permanent for
inference, at exactly RoPE's cost.

Prefix tokens (CLS, registers) get no rotation, as with every q/k PE, but they do get P: the fold
applies P to every token's q and k, which is STRING's formula at position 0 (RoPE(0) = I). That is
what makes the fold exact, and it keeps prefix-prefix scores unchanged (P is orthogonal).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .qk_base import QK_PES
from .rope import RopeAxial


class _StringBase(RopeAxial):
    """RoPE-Axial after a learned orthogonal basis (subclasses define :meth:`orthogonal`)."""

    def __init__(self, *, head_dim, num_heads, ndim, layer=0, depth=1, theta: float = 100.0,
                 axis_pairs: Optional[Tuple[int, ...]] = None):
        super().__init__(head_dim=head_dim, num_heads=num_heads, ndim=ndim, layer=layer, depth=depth,
                         theta=theta, axis_pairs=axis_pairs)

    def orthogonal(self) -> torch.Tensor:
        """(H, d, d) orthogonal basis P, computed in float32."""
        raise NotImplementedError

    def basis(self):
        return self.orthogonal()

    def as_rope(self) -> RopeAxial:
        """The plain RoPE-Axial this PE becomes once P is folded into the q/k weights."""
        return RopeAxial(head_dim=self.head_dim, num_heads=self.num_heads, ndim=self.ndim, layer=self.layer,
                         depth=self.depth, theta=self.theta, axis_pairs=self.axis_pairs).to(self.freqs)


@QK_PES.register("string_cayley", "STRING with Cayley basis P = (I - S)(I + S)^-1, S skew; starts as RoPE")
class StringCayley(_StringBase):
    """P = (I - S)(I + S)^-1 with S = A - A^T skew-symmetric, A learned per head and initialised at
    zero (so the model starts as exact RoPE). ``sparsity`` f in (0, 1] keeps a fixed random fraction f
    of the upper-triangle entries of S trainable. The mask is drawn from ``sparsity_seed`` and the
    layer; a run sets ``sparsity_seed`` to its ``train.seed`` unless given, so the seeds of a
    comparison sample the mask as they sample the rest of the initialisation (direct use: 0)."""

    def __init__(self, *, head_dim, num_heads, ndim, layer=0, depth=1, theta: float = 100.0,
                 axis_pairs: Optional[Tuple[int, ...]] = None, sparsity: float = 1.0, sparsity_seed: Optional[int] = None):
        super().__init__(head_dim=head_dim, num_heads=num_heads, ndim=ndim, layer=layer, depth=depth,
                         theta=theta, axis_pairs=axis_pairs)
        if not 0.0 < float(sparsity) <= 1.0:
            raise ValueError(f"string_cayley sparsity must be in (0, 1], got {sparsity}")
        self.sparsity = float(sparsity)
        rows, cols = torch.triu_indices(head_dim, head_dim, offset=1)
        if self.sparsity < 1.0:
            # A fixed, seeded subset of upper-triangle entries per head; the rest of S stays zero.
            gen = torch.Generator().manual_seed(int(sparsity_seed or 0) * 1000003 + layer)
            keep = max(1, round(self.sparsity * rows.numel()))
            idx = torch.stack([torch.randperm(rows.numel(), generator=gen)[:keep] for _ in range(num_heads)])
            rows, cols = rows[idx], cols[idx]  # (H, keep)
        else:
            rows, cols = rows.expand(num_heads, -1), cols.expand(num_heads, -1)
        # saved with the weights: a checkpoint loaded into a model built with another sparsity_seed (one
        # made from config.yaml's model keys alone, say) takes the mask its entries of S belong to
        self.register_buffer("rows", rows.contiguous())
        self.register_buffer("cols", cols.contiguous())
        # Only the trainable entries are parameters: a sparse S has fewer parameters, not a masked dense one.
        self.a = nn.Parameter(torch.zeros(num_heads, rows.shape[-1]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "a" in state_dict:  # a checkpoint from before the mask was saved: the seeded mask it had
            for name in ("rows", "cols"):
                state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def skew(self) -> torch.Tensor:
        """(H, d, d) skew-symmetric S with the trainable entries above the diagonal."""
        h, d = self.num_heads, self.head_dim
        upper = self.a.new_zeros(h, d * d, dtype=torch.float32)
        upper = upper.scatter(1, self.rows * d + self.cols, self.a.float()).view(h, d, d)
        return upper - upper.transpose(-1, -2)

    def orthogonal(self):
        s = self.skew()
        eye = torch.eye(self.head_dim, device=s.device, dtype=s.dtype)
        # X (I + S) = (I - S)  =>  X = (I - S)(I + S)^-1; I + S is always invertible for skew S, so
        # solve_ex without its error check: linalg.solve's check waits for the GPU in every layer.
        return torch.linalg.solve_ex(eye + s, eye - s, left=False, check_errors=False).result


@QK_PES.register("string_reflection", "STRING with P a product of k learned Householder reflections")
class StringReflection(_StringBase):
    """P = prod_i (I - 2 v_i v_i^T / |v_i|^2), ``reflections`` (default 2) vectors per head,
    initialised at random (P is then a random rotation/reflection: scores are still relative)."""

    def __init__(self, *, head_dim, num_heads, ndim, layer=0, depth=1, theta: float = 100.0,
                 axis_pairs: Optional[Tuple[int, ...]] = None, reflections: int = 2):
        super().__init__(head_dim=head_dim, num_heads=num_heads, ndim=ndim, layer=layer, depth=depth,
                         theta=theta, axis_pairs=axis_pairs)
        if isinstance(reflections, bool) or reflections != int(reflections) or not 1 <= reflections <= head_dim:
            # (any orthogonal d x d matrix is a product of <= d reflections; 2.5 trained with 2 before)
            raise ValueError(f"string_reflection needs a whole number 1 <= reflections <= head_dim = {head_dim}, "
                             f"got {reflections!r}")
        self.v = nn.Parameter(torch.randn(num_heads, int(reflections), head_dim) / head_dim ** 0.5)

    def orthogonal(self):
        v = self.v.float()
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        eye = torch.eye(self.head_dim, device=v.device, dtype=v.dtype)
        p = eye.expand(self.num_heads, -1, -1)
        for i in range(v.shape[1]):  # k is small (a handful of reflections), not a token loop
            vi = v[:, i]  # (H, d)
            p = p - 2 * (p @ vi.unsqueeze(-1)) * vi.unsqueeze(-2)  # p @ (I - 2 v v^T)
        return p
