"""The ``vit`` backbone: patch embed (2D/3D) -> prefix tokens -> [token PE] -> blocks -> pool -> head.

The backbone is the same for every variant: the token PE, the q/k PE and the kernel are modules
built from the registries and handed in; there are no per-variant branches here.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
from einops import rearrange
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .config import ModelConfig, own_rng
from .kernels import KERNELS
from .positions import Grid, make_grid
from .qk_base import QK_PES
from .token_pe import TOKEN_PES


class PatchEmbed(nn.Module):
    """Images (B, C, H, W) or volumes (B, C, H, W, D) -> patch tokens (B, N, dim), row-major over
    the grid. ``proj='conv'`` is the usual strided convolution; ``'linear'`` flattens each patch and
    applies one Linear (the PoPE-ViT study's 768 -> 512 projection)."""

    def __init__(self, patch_size: Tuple[int, ...], in_chans: int, dim: int, proj: str):
        super().__init__()
        self.patch_size, self.in_chans = tuple(patch_size), in_chans
        ndim = len(patch_size)
        if proj == "conv":
            conv = nn.Conv2d if ndim == 2 else nn.Conv3d
            self.proj = conv(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        else:
            self.proj = nn.Linear(in_chans * math.prod(patch_size), dim)
        self.linear = proj == "linear"

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...]]:
        grid = tuple(s // p for s, p in zip(x.shape[2:], self.patch_size))
        if not self.linear:
            y = self.proj(x)  # (B, dim, gh, gw[, gd])
            return y.flatten(2).transpose(1, 2), grid
        if len(grid) == 2:
            x = rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=self.patch_size[0], p2=self.patch_size[1])
        else:
            x = rearrange(x, "b c (h p1) (w p2) (d p3) -> b (h w d) (p1 p2 p3 c)", p1=self.patch_size[0],
                          p2=self.patch_size[1], p3=self.patch_size[2])
        return self.proj(x), grid


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x)), with drop-path."""

    def __init__(self, cfg: ModelConfig, layer: int, drop_path: float):
        super().__init__()
        ctx = dict(head_dim=cfg.head_dim, num_heads=cfg.heads, ndim=cfg.ndim, layer=layer, depth=cfg.depth)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=1e-6)
        with own_rng(2 * layer + 1):
            qk_pe = QK_PES.build(cfg.qk_pe, cfg.qk_pe_kwargs, **ctx)
        with own_rng(2 * layer + 2):
            kernel = KERNELS.build(cfg.attn, cfg.attn_kwargs, attn_drop=cfg.attn_drop, **ctx)
        self.attn = Attention(cfg.dim, cfg.heads, qkv_bias=cfg.qkv_bias, proj_drop=cfg.drop, qk_pe=qk_pe,
                              kernel=kernel)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio), act_layer=nn.GELU, drop=cfg.drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """Configurable ViT for 2D images and 3D volumes (see :class:`ModelConfig`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.num_prefix = cfg.num_prefix
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.dim, cfg.patch_proj)
        self.prefix = nn.Parameter(torch.zeros(1, cfg.num_prefix, cfg.dim)) if cfg.num_prefix else None
        with own_rng(0):
            self.token_pe = TOKEN_PES.build(cfg.token_pe, cfg.token_pe_kwargs, dim=cfg.dim,
                                            grid_shape=cfg.grid_shape, num_prefix=cfg.num_prefix)
        self.pos_drop = nn.Dropout(cfg.drop)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()  # stochastic depth grows with depth
        self.blocks = nn.ModuleList([Block(cfg, i, rates[i]) for i in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        head_in = cfg.dim * cfg.num_cls if cfg.pool == "cls" else cfg.dim
        self.head = nn.Linear(head_in, cfg.num_classes)
        self.grad_checkpointing = cfg.grad_checkpointing
        self._grids: Dict[tuple, Grid] = {}
        self._init_weights()

    def _init_weights(self):
        # timm/DeiT init: trunc-normal 0.02 for linear layers, tiny normal for prefix tokens.
        # PE and kernel parameters keep the initialisation their papers prescribe.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.prefix is not None:
            nn.init.normal_(self.prefix, std=1e-6)

    def no_weight_decay(self) -> set[str]:
        """Parameter names kept out of weight decay: prefix tokens and every PE parameter
        (tables, RoPE frequencies, PoPE phase bias, STRING bases). Norms and biases are excluded
        by the optimiser's ndim rule."""
        names = {"prefix"} if self.prefix is not None else set()
        names |= {f"token_pe.{n}" for n, _ in self.token_pe.named_parameters()}
        for i, blk in enumerate(self.blocks):
            names |= {f"blocks.{i}.attn.qk_pe.{n}" for n, _ in blk.attn.qk_pe.named_parameters()}
        return names

    def grid(self, shape: Tuple[int, ...], device) -> Grid:
        key = (tuple(shape), str(device))
        if key not in self._grids:
            self._grids[key] = make_grid(shape, self.num_prefix, device=device)
        return self._grids[key]

    def check_input(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        kind = "images (B, C, H, W)" if cfg.ndim == 2 else "volumes (B, C, H, W, D)"
        if x.dim() != cfg.ndim + 2:
            raise ValueError(f"this {cfg.ndim}D model takes {kind}; got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_chans:
            raise ValueError(f"this model takes {cfg.in_chans} channel(s); got {x.shape[1]} (shape {tuple(x.shape)})")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"input size {tuple(x.shape[2:])} is not divisible by patch_size={cfg.patch_size}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        tokens, shape = self.patch_embed(x)  # (B, N_patch, C)
        # the residual stream in the weights' dtype, float32 under autocast whatever the token PE (a bf16
        # patch embedding kept it bf16 with no PE or sincos, while a learned table's add made it float32:
        # arms compared at different precision), as timm's stream is with its class token
        tokens = tokens.to(self.norm.weight.dtype)
        grid = self.grid(shape, x.device)
        if self.prefix is not None:
            tokens = torch.cat([self.prefix.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = self.pos_drop(self.token_pe(tokens, grid))  # (B, N, C), prefix first
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, grid, use_reentrant=False)
            else:
                tokens = blk(tokens, grid)
        return self.norm(tokens)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "cls":
            pooled = tokens[:, : self.cfg.num_cls].flatten(1)  # CLS tokens concatenated
        else:
            pooled = tokens[:, self.num_prefix:].mean(dim=1)
        return self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
