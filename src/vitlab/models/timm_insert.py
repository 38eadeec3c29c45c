"""Put a vitlab q/k PE (and kernel) inside a timm ViT's attention — e.g. DeiT-Small + PoPE, as the
PoPE-ViT study did. The timm model keeps its weights, its patch embedding and its own absolute PE;
each block's attention is replaced by a vitlab :class:`Attention` that reuses the same ``qkv`` and
``proj`` layers, so pretrained weights load unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import Attention
from .kernels import KERNELS
from .positions import Grid, make_grid
from .qk_base import QK_PES


def check_timm_model(name: str) -> None:
    """ValueError when timm has no model ``name`` (the part after ``timm:``)."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; see timm.list_models() (e.g. resnet18, deit_small_patch16_224)")


class _GridSource:
    """The patch grid of the batch being processed, set by a forward pre-hook on the timm model's
    patch embedding (which sees the image)."""

    def __init__(self, patch_size, num_prefix: int):
        self.patch_size, self.num_prefix = tuple(patch_size), num_prefix
        self.shape = None
        self.grids: dict = {}

    def hook(self, module, args):
        x = args[0]
        self.shape = tuple(s // p for s, p in zip(x.shape[2:], self.patch_size))

    def grid(self, device) -> Grid:
        key = (self.shape, str(device))
        if key not in self.grids:
            self.grids[key] = make_grid(self.shape, self.num_prefix, device=device)
        return self.grids[key]


class TimmAttention(Attention):
    """vitlab's Attention behind timm's ``attn(x, attn_mask=None, is_causal=False)`` signature.
    Parameter names match timm's (``qkv``, ``proj``), so timm checkpoints load unchanged."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("vitlab q/k PEs in timm models support unmasked, non-causal attention only")
        return super().forward(x, self.grid_source.grid(x.device))


#: the parts of timm's plain ``Attention`` vitlab's replacement reuses (qkv, proj) or re-creates (the
#: dropouts); any other part that does something (q/k norms, a scale norm, gates, talking heads)
#: would be dropped, so a model that has one is refused
_PLAIN = {"qkv", "proj", "attn_drop", "proj_drop", "q_norm", "k_norm", "norm"}


def _check_plain(attn: nn.Module, i: int, model: nn.Module) -> None:
    """``attn`` is timm's plain multi-head attention: fused qkv, heads of dim // heads, no q/k norm or
    scale norm. Anything else is a one-line error rather than a model silently changed."""
    name = type(model).__name__
    if not (hasattr(attn, "qkv") and hasattr(attn, "proj") and hasattr(attn, "num_heads")):
        raise ValueError(f"model.qk_pe: {name} block {i} attention ({type(attn).__name__}) has no fused qkv/proj "
                         f"to reuse; vitlab inserts q/k PEs into timm ViTs with plain attention (vit_*, deit_*)")
    dim, heads = attn.qkv.in_features, attn.num_heads
    extra = sorted(n for n, c in attn.named_children() if n not in _PLAIN or
                   (n in ("q_norm", "k_norm", "norm") and not isinstance(c, nn.Identity)))
    if extra or attn.qkv.out_features != 3 * dim or getattr(attn, "head_dim", dim // heads) != dim // heads:
        what = f"its {', '.join(extra)}" if extra else "a head size other than dim / heads"
        raise ValueError(f"model.qk_pe: {name} block {i} attention ({type(attn).__name__}) has {what}, which "
                         f"vitlab's attention would drop; vitlab inserts q/k PEs into timm ViTs with plain "
                         f"attention only (vit_*, deit_* without qk_norm or scale_attn_norm)")


def insert_qk_pe(model: nn.Module, qk_pe: str, qk_pe_kwargs: Optional[dict] = None, attn: str = "standard",
                 attn_kwargs: Optional[dict] = None) -> nn.Module:
    """Replace every block's attention of a timm ``VisionTransformer`` by vitlab's, with the given
    q/k PE and kernel, in place. Returns the model."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(f"model.qk_pe needs a timm VisionTransformer (blocks + patch_embed); "
                         f"{type(model).__name__} is not one")
    source = _GridSource(model.patch_embed.patch_size, model.num_prefix_tokens)
    model.patch_embed.register_forward_pre_hook(source.hook)  # every path in (forward, forward_features,
    # forward_intermediates) embeds the image first
    for i, blk in enumerate(blocks):
        old = blk.attn
        _check_plain(old, i, model)
        dim, heads = old.qkv.in_features, old.num_heads
        ctx = dict(head_dim=dim // heads, num_heads=heads, ndim=2, layer=i, depth=len(blocks))
        new = TimmAttention(dim, heads, qk_pe=QK_PES.build(qk_pe, qk_pe_kwargs, **ctx),
                            kernel=KERNELS.build(attn, attn_kwargs, attn_drop=getattr(old, "attn_drop", nn.Dropout(0)).p,
                                                 **ctx),
                            qkv_bias=old.qkv.bias is not None)
        new.qkv, new.proj = old.qkv, old.proj  # the same modules: pretrained weights stay where they were
        new.proj_drop = getattr(old, "proj_drop", new.proj_drop)
        new.grid_source = source
        blk.attn = new
    return model
