"""Put a vitlab q/k PE (and kernel) inside a timm ViT's attention — e.g. DeiT-Small + PoPE, as the
PoPE-ViT study did. The timm model keeps its weights, its patch embedding and its own absolute PE;
each block's attention is replaced by a vitlab :class:`Attention` that reuses the same ``qkv`` and
``proj`` layers, so pretrained weights load unchanged.
"""
from __future__ import annotations

import threading
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


#: model keys vitlab reads for the q/k PE and kernel it inserts into a timm model
VITLAB_KEYS = ("qk_pe", "qk_pe_kwargs", "attn", "attn_kwargs")


def timm_kwargs(model: dict) -> dict:
    """The ``model.*`` keys of a ``timm:`` config that go to ``timm.create_model`` (all but the name,
    the weights, vitlab's size preset and class count, and the inserted PE/kernel's keys)."""
    return {k: v for k, v in model.items() if k not in ("name", "pretrained", "size", "num_classes") + VITLAB_KEYS}


class _GridSource:
    """The patch grid of the batch being processed, set by a forward pre-hook on the timm model's
    patch embedding (which sees the image). Per thread: two threads running one model on images of
    other shapes (32x64 and 64x32: the same token count) would otherwise read each other's grid.
    ``pad``: the embedding pads images to whole patches (timm's ``dynamic_img_pad``), so the grid
    rounds up."""

    def __init__(self, patch_size, num_prefix: int, pad: bool = False):
        self.patch_size, self.num_prefix, self.pad = tuple(patch_size), num_prefix, pad
        self.local = threading.local()
        self.grids: dict = {}

    def __getstate__(self):  # deepcopy (EMA) and pickling: a thread-local is neither
        state = dict(self.__dict__)
        state["local"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.local = threading.local()

    def hook(self, module, args):
        x = args[0]
        self.local.shape = tuple(-(-s // p) if self.pad else s // p for s, p in zip(x.shape[2:], self.patch_size))

    def grid(self, device) -> Grid:
        shape = getattr(self.local, "shape", None)
        if shape is None:
            raise ValueError("a vitlab q/k PE in a timm model reads the patch grid of the image the model "
                             "embedded; call the model (or forward_features) on images, not its blocks alone")
        key = (shape, str(device))
        if key not in self.grids:
            self.grids[key] = make_grid(shape, self.num_prefix, device=device)
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
    """``attn`` is timm's plain multi-head attention (its ``Attention`` class itself, not a subclass
    or look-alike): fused qkv, heads of dim // heads, no q/k norm or scale norm, no parameters of its
    own (BEiT's q/v biases and relative-position table, Eva's, sit there). Anything else is a
    one-line error rather than a model silently changed or a crash at its first forward."""
    from timm.models import vision_transformer as vt

    name = type(model).__name__
    own = [n for n, _ in (*attn.named_parameters(recurse=False), *attn.named_buffers(recurse=False))]
    if type(attn) is not vt.Attention or own or not isinstance(getattr(attn, "qkv", None), nn.Linear):
        what = f"parameters of its own ({', '.join(own)})" if own else "no fused qkv layer"
        raise ValueError(f"model.qk_pe: {name} block {i} attention ({type(attn).__name__}) is not timm's plain "
                         f"Attention{f' (it has {what})' if own or type(attn) is vt.Attention else ''}; vitlab "
                         f"inserts q/k PEs into timm ViTs with plain attention (vit_*, deit_*)")
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
    from timm.layers import PatchEmbed
    from timm.models import vision_transformer as vt

    blocks = getattr(model, "blocks", None)
    name = type(model).__name__
    if blocks is None or not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(f"model.qk_pe needs a timm VisionTransformer (blocks + patch_embed); "
                         f"{name} is not one")
    # the q/k PE reads the grid of patches the embedding cut: a CNN stem (hybrid ViTs) has another
    # stride, and dropped patches (patch_drop_rate) leave no grid
    if type(model.patch_embed) is not PatchEmbed:
        raise ValueError(f"model.qk_pe: {name} embeds patches with {type(model.patch_embed).__name__}, not timm's "
                         f"PatchEmbed (a hybrid CNN stem?), so its tokens are no grid of patch_size patches")
    patch_drop = getattr(model, "patch_drop", None)
    if patch_drop is not None and not isinstance(patch_drop, nn.Identity):
        raise ValueError(f"model.qk_pe: {name} drops patches in training (patch_drop_rate > 0): the tokens left "
                         f"are no grid for a q/k PE; set patch_drop_rate=0")
    for i, blk in enumerate(blocks):
        if type(blk) not in (vt.Block, vt.ResPostBlock) or not isinstance(getattr(blk, "attn", None), nn.Module):
            kind = f"{type(blk).__module__}.{type(blk).__name__}"
            raise ValueError(f"model.qk_pe: {name} block {i} is a {kind}, not timm's vision_transformer Block with "
                             f"one attention; vitlab inserts q/k PEs into timm ViTs with plain blocks (vit_*, deit_*)")
    source = _GridSource(model.patch_embed.patch_size, model.num_prefix_tokens,
                         pad=bool(getattr(model.patch_embed, "dynamic_img_pad", False)))
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
