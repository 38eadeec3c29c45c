"""Looking inside a trained model: attention maps, and STRING folded for inference."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .attention import Attention, fold_basis
from .string_pe import _StringBase


def _attention_modules(model: nn.Module) -> List[Attention]:
    mods = [m for m in model.modules() if isinstance(m, Attention)]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no vitlab attention modules")
    return mods


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> List[torch.Tensor]:
    """Post-softmax attention maps of every block, for ``images`` (B, C, H, W) or volumes.

    Returns one tensor per block, (B, heads, N, N), tokens ordered prefix first then patches
    row-major. Maps are computed with the eager arithmetic of the model's own kernel (after its
    q/k PE), whatever fused path it trains with. For ``differential`` kernels each map is the
    combined A = softmax(Q1K1) - lambda softmax(Q2K2) of the heads/2 differential heads: rows sum to
    1 - lambda and entries can be negative. The model runs in eval mode and is restored after.
    """
    mods = _attention_modules(model)
    modes = {m: m.training for m in model.modules()}  # each module's own: a frozen part may be in eval
    model.eval()
    maps: List[torch.Tensor] = []
    try:
        for m in mods:
            m.record = maps
        model(images)
    finally:
        for m in mods:
            m.record = None
        for m, training in modes.items():
            m.training = training
    return maps


@torch.no_grad()
def fold_string(model: nn.Module) -> int:
    """Absorb every STRING basis P into its attention's q/k projection weights, in place.

    Afterwards each STRING layer is plain RoPE-Axial on the folded weights: its PE module is
    replaced by a ``rope_axial`` one, so inference costs exactly what ``rope_axial`` costs, outputs
    are unchanged up to float rounding, and the folded state dict loads into a ``rope_axial`` model
    (and fails loudly, rather than applying P twice, in a STRING one). Returns the number of layers
    folded (0 if the model has no STRING PE). Fold a copy if you will train on.
    """
    folded = 0
    for m in _attention_modules(model):
        pe = m.qk_pe
        if isinstance(pe, _StringBase):
            weight, bias = fold_basis(m.qkv.weight, m.qkv.bias, pe.orthogonal(), m.num_heads)
            m.qkv.weight.copy_(weight)
            if bias is not None:
                m.qkv.bias.copy_(bias)
            m.qk_pe = pe.as_rope()
            folded += 1
    return folded
