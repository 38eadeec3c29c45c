"""The model's typed, frozen configuration: one source of truth for :func:`vitlab.create_model`."""
from __future__ import annotations

import contextlib
import math
from typing import Literal, Tuple, Union, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .kernels import KERNELS
from .qk_base import QK_PES
from .sizes import SIZES
from .token_pe import TOKEN_PES

Size = Union[int, Tuple[int, int], Tuple[int, int, int]]


@contextlib.contextmanager
def own_rng(stream: int):
    """Random draws inside come from a stream of their own, seeded from the current seed and
    ``stream``, and leave the global one where it was: the PE and kernel modules (RoPE-Mixed's
    angles, STRING's reflections, the differential lambdas, a learned table) are built inside, so an
    arm's backbone starts from the same weights as every other arm's at the same seed, and the
    seed-paired comparison differs in the PE or kernel alone (their draws shifted the backbone's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((torch.initial_seed() + 1_000_003 * stream) % 2**63)
        yield


class NumbersNotBools(BaseModel):
    """A config section whose number fields refuse true/false: pydantic's lax mode reads ``true`` as 1,
    so ``train.epochs=true`` trained one epoch and ``model.depth=true`` one block, with config.yaml
    still saying ``true``."""

    @field_validator("*", mode="before")
    @classmethod
    def _not_a_bool(cls, value, info: ValidationInfo):
        if isinstance(value, bool):
            kinds = get_args(cls.model_fields[info.field_name].annotation) or (
                cls.model_fields[info.field_name].annotation,)
            if bool not in kinds and (int in kinds or float in kinds):
                raise ValueError("expected a number, not true/false")
        return value


class ModelConfig(NumbersNotBools):
    """Every field of the ``vit`` backbone. ``img_size``/``patch_size`` are normalised to tuples of
    the model's dimensionality: (H, W) for images, (H, W, D) for volumes."""

    # allow_inf_nan=False: mlp_ratio=inf passes gt=0 and only fails when the MLP is built
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    img_size: Size = 224
    patch_size: Size = 16
    in_chans: int = Field(3, ge=1)
    num_classes: int = Field(10, ge=1)
    dim: int = Field(192, ge=1)
    depth: int = Field(12, ge=1)
    heads: int = Field(3, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    drop: float = Field(0.0, ge=0, lt=1)
    attn_drop: float = Field(0.0, ge=0, lt=1)
    drop_path: float = Field(0.0, ge=0, lt=1)
    qkv_bias: bool = True
    patch_proj: Literal["conv", "linear"] = "conv"
    num_cls: int = Field(1, ge=0)
    num_registers: int = Field(0, ge=0)
    pool: Literal["cls", "mean"] = "cls"
    token_pe: str = "none"
    token_pe_kwargs: dict = Field(default_factory=dict)
    qk_pe: str = "none"
    qk_pe_kwargs: dict = Field(default_factory=dict)
    attn: str = "standard"
    attn_kwargs: dict = Field(default_factory=dict)
    grad_checkpointing: bool = False

    @model_validator(mode="after")
    def _check(self):
        img = (self.img_size,) * 2 if isinstance(self.img_size, int) else tuple(self.img_size)
        ndim = len(img)
        patch = (self.patch_size,) * ndim if isinstance(self.patch_size, int) else tuple(self.patch_size)
        if len(patch) != ndim:
            raise ValueError(f"patch_size={self.patch_size} has {len(patch)} axes but img_size={self.img_size} has {ndim}")
        if min(img) < 1 or min(patch) < 1:
            raise ValueError(f"img_size={self.img_size} and patch_size={self.patch_size} must be positive")
        bad = [(i, p) for i, p in zip(img, patch) if i % p]
        if bad:
            raise ValueError(f"img_size={img} is not divisible by patch_size={patch}")
        object.__setattr__(self, "img_size", img)
        object.__setattr__(self, "patch_size", patch)
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        hidden = self.dim * self.mlp_ratio  # (inf for a huge ratio: int() of it was an OverflowError)
        if not 1 <= hidden <= 2 ** 31:  # timm's Mlp would take 0 hidden units as "dim" silently
            raise ValueError(f"mlp_ratio={self.mlp_ratio} gives dim x mlp_ratio = {hidden:g} hidden units; "
                             f"expected 1 to 2^31")
        if self.pool == "cls" and self.num_cls < 1:
            raise ValueError("pool='cls' needs num_cls >= 1 (or use pool='mean')")
        for reg, name in ((TOKEN_PES, self.token_pe), (QK_PES, self.qk_pe), (KERNELS, self.attn)):
            reg.get(name)  # unknown names list the valid ones
        self._check_catalogue()
        return self

    def _check_catalogue(self) -> None:
        """Build the first layer's PEs and kernel (cheap, no forward) so that every shape
        constraint they have surfaces here, with the model's own numbers attached."""
        d = self.dim // self.heads
        ctx = dict(head_dim=d, num_heads=self.heads, ndim=self.ndim, layer=0, depth=self.depth)
        grid = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
        checks = [
            (f"token_pe={self.token_pe!r} (dim={self.dim})", lambda: TOKEN_PES.build(
                self.token_pe, self.token_pe_kwargs, dim=self.dim, grid_shape=grid,
                num_prefix=self.num_cls + self.num_registers)),
            (f"qk_pe={self.qk_pe!r} (head_dim={d} = dim {self.dim} / heads {self.heads}, {self.ndim}D)",
             lambda: QK_PES.build(self.qk_pe, self.qk_pe_kwargs, **ctx)),
            (f"attn={self.attn!r} (heads={self.heads})",
             lambda: KERNELS.build(self.attn, self.attn_kwargs, attn_drop=self.attn_drop, **ctx)),
        ]
        for what, build in checks:
            try:
                with own_rng(0):  # (their random draws, discarded, would move the model's initialisation)
                    build()
            except (ValueError, TypeError, OverflowError) as err:  # OverflowError: int(inf) of a free-form option
                raise ValueError(f"{what}: {err}") from None
            except (RuntimeError, MemoryError) as err:
                msg = " ".join(str(err).split())
                if isinstance(err, RuntimeError) and "allocate" not in msg and "out of memory" not in msg:
                    raise
                raise ValueError(f"{what}: too large to build in this machine's memory ({msg[:160]})") from None

    @property
    def ndim(self) -> int:
        return len(self.img_size)

    @property
    def grid_shape(self) -> Tuple[int, ...]:
        return tuple(i // p for i, p in zip(self.img_size, self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def num_prefix(self) -> int:
        return self.num_cls + self.num_registers

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_shape)


def one_line_error(err: ValidationError, root: type) -> str:
    """A pydantic ValidationError as one line: each problem with its dotted key and the value given;
    an unknown key lists the valid keys of its section (found by walking ``root``'s fields)."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            cls, prefix = root, ""
            for part in e["loc"][:-1]:
                cls, prefix = cls.model_fields[part].annotation, f"{prefix}{part}."
            parts.append(f"unknown key {loc!r}; valid: {', '.join(prefix + k for k in cls.model_fields)}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg} (got {e.get('input')!r})" if loc else msg)
    return "; ".join(parts)


def make_config(size: str | None = None, **kwargs) -> ModelConfig:
    """Build a validated :class:`ModelConfig` from an optional size preset plus overrides.

    Raises ValueError naming the offending value and what would be valid."""
    base = {}
    if size is not None:
        if not isinstance(size, str) or size not in SIZES:  # a list or mapping is not a name (nor hashable)
            raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
        base = dict(SIZES[size])
    base.update(kwargs)
    try:
        return ModelConfig(**base)
    except ValidationError as err:
        raise ValueError(f"invalid model config: {one_line_error(err, ModelConfig)}") from None
