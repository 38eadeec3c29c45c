"""Size presets are data: an experiment is size x PE x attention x recipe (DESIGN section 3).

Each preset is a dict of :func:`vitlab.create_model` keyword arguments; explicit arguments win.
"""
from __future__ import annotations

SIZES: dict[str, dict] = {
    # Standard ViT shapes (Dosovitskiy et al.; DeiT).
    "tiny": dict(dim=192, depth=12, heads=3, mlp_ratio=4.0),
    "small": dict(dim=384, depth=12, heads=6, mlp_ratio=4.0),
    "base": dict(dim=768, depth=12, heads=12, mlp_ratio=4.0),
    # The reference studies (DESIGN section 1).
    "string-mnist": dict(img_size=28, patch_size=7, in_chans=1, dim=128, depth=4, heads=4, mlp_ratio=4.0),
    "string-cifar": dict(img_size=32, patch_size=4, in_chans=3, dim=192, depth=4, heads=4, mlp_ratio=4.0),
    "minivit": dict(img_size=32, patch_size=4, in_chans=3, dim=96, depth=9, heads=12, mlp_ratio=2.0,
                    num_cls=2, token_pe="sincos"),
    "clearvit-tiny": dict(img_size=224, patch_size=16, in_chans=3, dim=192, depth=12, heads=3, mlp_ratio=4.0),
    # PoPE-ViT's MRI model: 16x16 patches, 768 -> 512 linear patch projection, 6 blocks, CLS + mean pooling.
    "pope-mri": dict(img_size=224, patch_size=16, in_chans=3, dim=512, depth=6, heads=8, mlp_ratio=4.0,
                     patch_proj="linear", pool="mean", num_cls=1),
    # Volumetric encoder: 256x256x64 volumes, 16x16x4 patches, factorised learned 3D table.
    "volume": dict(img_size=(256, 256, 64), patch_size=(16, 16, 4), in_chans=1, dim=384, depth=12, heads=4,
                   mlp_ratio=4.0, token_pe="learned3d"),
}
