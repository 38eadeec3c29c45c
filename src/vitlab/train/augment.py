"""Batched augmentation on the training device.

Small datasets live as uint8 tensors on the device; each batch is augmented there in a few
tensor ops, so the input pipeline costs a few percent of a step even on a 2-core CPU.
torchvision's v2 transforms draw one set of random parameters per call, i.e. per batch when given
a batch; flips and crops need a draw per image, so those two are written here as vectorised ops.
RandomErasing comes from timm and erases per image; MixUp/CutMix come from timm too, in its
"batch" mode (one mixing weight and one box per batch, pairing each image with the batch reversed;
it needs an even batch, so an odd one passes unmixed);
AutoAugment/RandAugment are torchvision's v2 policies, applied image by image (uint8, before
normalisation) because a policy draws one operation per call. Those library transforms draw from
the global generators, which the model's dropout draws from too; they run on a private stream
(:class:`~vitlab.train.rng.PrivateStream`), so every arm of a comparison sees the same augmented
batches for a seed whatever its dropout.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .rng import PrivateStream


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (random draws made on the CPU generator, so batches are the same on every device) on
    ``device``. To a GPU through pinned memory and without blocking: a copy from ordinary memory
    makes the host wait until the GPU has finished all queued work, once per draw, every step."""
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flip each image of (B, C, H, W[, D]) left-right with probability 1/2."""
    mask = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    mask = to_device(mask, x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(mask, x.flip(3), x)


def random_crop(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad (B, C, H, W) by ``pad`` and crop back at a random offset per image."""
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    off = to_device(torch.randint(0, 2 * pad + 1, (2, b), generator=gen, device=gen.device), x.device)
    rows = (torch.arange(h, device=x.device) + off[0, :, None])  # (B, H)
    cols = (torch.arange(w, device=x.device) + off[1, :, None])  # (B, W)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def random_affine(x: torch.Tensor, degrees: float, translate: float, scale: Tuple[float, float],
                  gen: torch.Generator, fill: Optional[torch.Tensor] = None) -> torch.Tensor:
    """torchvision's RandomAffine (rotation up to +-``degrees``, shift up to ``translate`` of the
    size, zoom in ``scale``), drawn per image and applied to the whole batch in one
    ``grid_sample``; (B, C, H, W) float. Uncovered pixels get ``fill`` (per channel; default 0):
    on normalised images, the value of a black pixel, as torchvision's fill=0 gives on raw ones."""
    b = x.shape[0]
    u = to_device(torch.rand(4, b, generator=gen), x.device)
    angle = (u[0] * 2 - 1) * degrees * torch.pi / 180
    zoom = scale[0] + u[1] * (scale[1] - scale[0])
    tx, ty = (u[2] * 2 - 1) * translate * 2, (u[3] * 2 - 1) * translate * 2  # grid units span 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # theta acts on coordinates normalised to [-1, 1] per axis: a rotation in pixels is S^-1 R S with
    # S = diag(W, H), so on a non-square image the off-diagonal terms carry the aspect ratio
    aspect = x.shape[-2] / x.shape[-1]  # H / W
    theta = torch.stack([torch.stack([cos, -sin * aspect, tx], 1), torch.stack([sin / aspect, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if fill is None:
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    fill = fill.view(1, -1, 1, 1)  # grid_sample pads with zeros: shift the fill value to zero and back
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def match_channels(x: torch.Tensor, channels: Optional[int]) -> torch.Tensor:
    """Grey data for a colour model (replicated) or colour data for a grey model (averaged)."""
    if channels is None or x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, *x.shape[2:])
    if channels == 1:
        return x.float().mean(1, keepdim=True).round().to(x.dtype)
    raise ValueError(f"cannot feed {x.shape[1]}-channel data to a {channels}-channel model")


#: augmentations written for 2D images (timm's RandomErasing and CutMix cut boxes in the last two axes)
IMAGE_ONLY = ("crop_pad", "auto_augment", "affine_degrees", "affine_translate", "affine_scale", "random_erasing",
              "cutmix")


def check_dims(data_cfg, ndim: int) -> None:
    """Refuse 2D-only augmentations for volumes (one line), rather than skip or mangle them."""
    if ndim != 3:
        return
    fields = type(data_cfg).model_fields
    on = [k for k in IMAGE_ONLY if getattr(data_cfg, k) != fields[k].default]
    if on:
        raise ValueError(f"{', '.join(f'data.{k}' for k in on)}: 2D image augmentation, but the data are 3D "
                         f"volumes; leave {'it' if len(on) == 1 else 'them'} at the default (volumes take "
                         f"data.hflip and data.mixup)")


class BatchAugment:
    """uint8 batch -> normalised float batch (+ soft targets when MixUp/CutMix are on)."""

    def __init__(self, *, mean: torch.Tensor, std: torch.Tensor, num_classes: int, hflip: bool = False,
                 crop_pad: int = 0, mixup: float = 0.0, cutmix: float = 0.0, mix_prob: float = 1.0,
                 random_erasing: float = 0.0, auto_augment: str = "none", auto_augment_policy: str = "cifar10",
                 randaugment_ops: int = 2, randaugment_magnitude: int = 9, affine_degrees: float = 0.0,
                 affine_translate: float = 0.0, affine_scale: Tuple[float, float] = (1.0, 1.0),
                 channels: Optional[int] = None, label_smoothing: float = 0.0, img_size: Optional[Tuple[int, ...]] = None,
                 seed: int = 0, device: torch.device = torch.device("cpu")):
        self.device = device
        self.set_norm(mean, std)
        self.hflip, self.crop_pad, self.img_size, self.channels = hflip, crop_pad, img_size, channels
        self.affine = (affine_degrees, affine_translate, tuple(affine_scale))
        self.use_affine = affine_degrees > 0 or affine_translate > 0 or tuple(affine_scale) != (1.0, 1.0)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.stream = PrivateStream(seed + 104729)  # for the library transforms below
        self.mix = None
        if mixup > 0 or cutmix > 0:
            from timm.data import Mixup
            self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=mix_prob, mode="batch",
                             label_smoothing=label_smoothing, num_classes=num_classes)
        self.policy = None
        if auto_augment != "none":
            from torchvision.transforms import v2
            if auto_augment == "autoaugment":
                self.policy = v2.AutoAugment(v2.AutoAugmentPolicy(auto_augment_policy))
            else:
                self.policy = v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude)
        self.erase = None
        if random_erasing > 0:
            from timm.data.random_erasing import RandomErasing
            self.erase = RandomErasing(probability=random_erasing, mode="pixel", device=str(device))

    @classmethod
    def from_config(cls, cfg, *, mean: torch.Tensor, std: torch.Tensor, num_classes: int, channels: int,
                    img_size: Optional[Tuple[int, ...]], seed: int, device: torch.device) -> "BatchAugment":
        """The augmentation a run's config (``data.*`` augmentation keys, ``train.label_smoothing``)
        asks for: what training and ``vitlab bench --input`` apply."""
        d = cfg.data
        return cls(mean=mean, std=std, num_classes=num_classes, hflip=d.hflip, crop_pad=d.crop_pad, mixup=d.mixup,
                   cutmix=d.cutmix, mix_prob=d.mix_prob, random_erasing=d.random_erasing,
                   auto_augment=d.auto_augment, auto_augment_policy=d.auto_augment_policy,
                   randaugment_ops=d.randaugment_ops, randaugment_magnitude=d.randaugment_magnitude,
                   affine_degrees=d.affine_degrees,
                   affine_translate=d.affine_translate, affine_scale=d.affine_scale, channels=channels,
                   label_smoothing=cfg.train.label_smoothing, img_size=img_size, seed=seed, device=device)

    def set_norm(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Normalise with per-channel ``mean`` and ``std`` (of pixels in [0, 1])."""
        self.mean, self.std = mean.float().to(self.device), std.float().to(self.device)
        self.black = -self.mean / self.std  # a black pixel once normalised: RandomAffine's fill

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = match_channels(x, self.channels).float().div_(255)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x = (x - self.mean.view(shape)) / self.std.view(shape)
        if self.img_size is not None and tuple(x.shape[2:]) != tuple(self.img_size):
            mode = "bilinear" if x.dim() == 4 else "trilinear"
            x = F.interpolate(x, size=self.img_size, mode=mode, align_corners=False, antialias=x.dim() == 4)
        return x

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        """Training batch: returns (images, targets); targets are soft (B, classes) under MixUp/CutMix."""
        library = self.policy is not None or self.erase is not None or self.mix is not None
        with self.stream.use() if library else nullcontext():  # one swap of generators per batch
            if self.hflip:
                x = random_flip(x, self.gen)
            if self.crop_pad:
                x = random_crop(x, self.crop_pad, self.gen)
            if self.policy is not None:
                x = torch.stack([self.policy(img) for img in x])  # one policy draw per image (uint8)
            x = self.normalize(x)
            if self.use_affine:
                x = random_affine(x, *self.affine, self.gen, fill=self.black)
            if self.erase is not None:
                x = self.erase(x)
            if self.mix is not None and x.shape[0] % 2 == 0:
                x, y = self.mix(x, y)
        return x, y

    def get_state(self) -> dict:
        """Where its random draws stand, for a checkpoint (:meth:`set_state` restores it)."""
        return {"gen": self.gen.get_state(), "stream": self.stream.state}

    def set_state(self, state) -> None:
        if isinstance(state, torch.Tensor):  # a checkpoint from before the private stream
            self.gen.set_state(state)
            return
        self.gen.set_state(state["gen"])
        self.stream.state = state["stream"]
