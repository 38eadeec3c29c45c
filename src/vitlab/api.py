"""The public Python API (other tools call exactly these)."""
from __future__ import annotations

from typing import Optional

from .models import VisionTransformer, make_config
from .models.inspect import attention_maps, fold_string

__all__ = ["attention_maps", "create_model", "fold_string"]


def create_model(img_size=None, patch_size=None, in_chans=None, num_classes=None, dim=None, depth=None, heads=None,
                 token_pe: Optional[str] = None, qk_pe: Optional[str] = None, attn: Optional[str] = None,
                 qk_pe_kwargs: Optional[dict] = None, *, size: Optional[str] = None, **more) -> VisionTransformer:
    """Build a ``vit`` model mapping images (B, C, H, W) or volumes (B, C, H, W, D) to logits.

    Every argument left at None takes the ``size`` preset's value, else the
    :class:`vitlab.models.ModelConfig` default (ViT-Tiny at 224 px, 3 channels, 10 classes,
    ``token_pe="none"``, ``qk_pe="none"``, ``attn="standard"``).

    Args:
        img_size, patch_size: int, (H, W) or (H, W, D) — a 3-tuple makes a volumetric model.
        dim, depth, heads: width, blocks and heads.
        token_pe: ``none`` | ``learned`` | ``sincos`` | ``learned3d`` (options in ``token_pe_kwargs``).
        qk_pe: ``none`` | ``rope_axial`` | ``rope_mixed`` | ``pope`` | ``string_cayley`` |
            ``string_reflection`` (options in ``qk_pe_kwargs``, e.g. ``{"sparsity": 0.5}``).
        attn: attention kernel: ``standard`` | ``eager`` | ``differential`` |
            ``differential_entropy`` | ``suppression`` | ``diffsim`` (options in ``attn_kwargs``).
        size: a preset from ``vitlab.SIZES`` (``vitlab list`` shows them).
        **more: any other :class:`vitlab.models.ModelConfig` field (``mlp_ratio``, ``drop_path``,
            ``num_cls``, ``pool``, ``patch_proj``, ``grad_checkpointing``, ...).

    The model also accepts, at inference, inputs of another size divisible by the patch: relative
    PEs use the new coordinates, ``learned`` is resized, ``sincos`` recomputed.

    Raises:
        ValueError: before any computation, for any invalid configuration, naming the value given
            and what would be valid.
    """
    given = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes, dim=dim,
                 depth=depth, heads=heads, token_pe=token_pe, qk_pe=qk_pe, attn=attn, qk_pe_kwargs=qk_pe_kwargs)
    kwargs = {k: v for k, v in given.items() if v is not None}
    return VisionTransformer(make_config(size, **kwargs, **more))
