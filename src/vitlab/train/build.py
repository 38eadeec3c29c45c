"""Model and optimiser parameter groups for a run."""
from __future__ import annotations

from typing import Tuple

from torch import nn

from ..config import RunConfig
from ..models import VisionTransformer


def build_model(cfg: RunConfig, *, in_chans: int, num_classes: int, img_size: Tuple[int, ...]) -> Tuple[nn.Module, dict]:
    """The run's model; image size, channels and classes default to the data's.

    ``model.name`` is ``vit`` (the vitlab backbone) or ``timm:<name>`` (any timm model, with
    ``model.pretrained`` a local weights file, or ``true`` for the hub when online)."""
    cfg = _seed_string_mask(cfg)
    name = cfg.model.get("name", "vit")
    want = cfg.model.get("img_size")
    if isinstance(want, (list, tuple)) and len(want) != len(img_size):
        kind = {2: "2D images", 3: "3D volumes"}
        raise ValueError(f"the data are {kind.get(len(img_size), img_size)} {tuple(img_size)} but model.img_size={list(want)} "
                         f"makes a {len(want)}D model: drop model.img_size or give {len(img_size)} sizes")
    given = cfg.model.get("num_classes")
    if given is not None and given != num_classes:
        raise ValueError(f"model.num_classes={given} but the data has {num_classes} classes")
    if name == "vit":
        mcfg = cfg.model_cfg(**{"img_size": img_size, "in_chans": in_chans, "num_classes": num_classes})
        return VisionTransformer(mcfg), mcfg.model_dump(mode="json")
    return build_timm(name.removeprefix("timm:"), cfg, in_chans, num_classes, img_size)


def _seed_string_mask(cfg: RunConfig) -> RunConfig:
    """STRING's sparsity mask is part of the random initialisation: unless the run sets
    ``model.qk_pe_kwargs.sparsity_seed``, it is drawn from ``train.seed`` (the same on every rank),
    so the seeds of a comparison sample the mask too, and eval and resume rebuild the same one."""
    kwargs = cfg.model.get("qk_pe_kwargs") or {}
    if cfg.model.get("qk_pe") != "string_cayley" or kwargs.get("sparsity_seed") is not None:
        return cfg
    model = {**cfg.model, "qk_pe_kwargs": {**kwargs, "sparsity_seed": cfg.train.seed}}
    return cfg.model_copy(update={"model": model})


def build_timm(name: str, cfg: RunConfig, in_chans: int, num_classes: int, img_size) -> Tuple[nn.Module, dict]:
    import timm

    from ..models.timm_insert import VITLAB_KEYS, check_timm_model, timm_kwargs

    check_timm_model(name)
    kwargs = timm_kwargs(cfg.model)
    inserted = {k: cfg.model[k] for k in VITLAB_KEYS if k in cfg.model}
    in_chans = kwargs.pop("in_chans", in_chans)  # the model's channels win; the data are converted to them
    pretrained = cfg.model.get("pretrained") or False
    extra = {}
    if isinstance(pretrained, str):
        from pathlib import Path
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"model.pretrained weights file not found: {pretrained}")
        extra["pretrained_cfg_overlay"] = {"file": pretrained}
        pretrained = True
    elif pretrained:
        _check_hub_reachable(name)
    if "vit" in name or "deit" in name:
        kwargs.setdefault("img_size", img_size[0] if len(set(img_size)) == 1 else img_size)
        # at the trained size the output is unchanged; at another size timm resamples its position
        # table instead of refusing the input, so the report's resolution sweep covers timm ViTs too
        kwargs.setdefault("dynamic_img_size", True)
    try:
        model = timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes, in_chans=in_chans,
                                  **kwargs, **extra)
    except TypeError as err:
        raise ValueError(f"timm model {name!r} does not take {sorted(kwargs)}: {err}") from None
    except (OSError, RuntimeError) as err:  # hub unreachable offline, bad weights file
        raise RuntimeError(f"could not load pretrained weights for timm:{name} ({' '.join(str(err).split())[:200]}); "
                           f"offline, pass model.pretrained=/path/to/weights") from None
    if inserted.get("qk_pe", "none") != "none" or inserted.get("attn", "standard") != "standard":
        from ..models.timm_insert import insert_qk_pe
        insert_qk_pe(model, inserted.get("qk_pe", "none"), inserted.get("qk_pe_kwargs"),
                     inserted.get("attn", "standard"), inserted.get("attn_kwargs"))
    return model, {**kwargs, **inserted, "name": f"timm:{name}", "pretrained": cfg.model.get("pretrained"),
                   "img_size": list(img_size), "in_chans": in_chans, "num_classes": num_classes}


def _check_hub_reachable(name: str, host: str = "huggingface.co") -> None:
    """Fail at once, not after the hub client's minute of retries, when the hub cannot be reached."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # the user's local hub cache may hold the weights
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise RuntimeError(f"model.pretrained=true needs the timm hub ({host}), which cannot be reached from "
                           f"here; pass model.pretrained=/path/to/{name}.safetensors (or .pth)") from None


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """AdamW groups: no weight decay on norms, biases (ndim <= 1), and what the model names in
    ``no_weight_decay()`` (prefix tokens, PE tables, RoPE frequencies, STRING bases)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        pe = ".qk_pe." in f".{name}"  # a q/k PE's parameters, also where inserted into a timm model (whose
        # no_weight_decay() names only its own pos_embed and tokens)
        (no_decay if p.ndim <= 1 or pe or name in skip or any(name.startswith(s + ".") for s in skip)
         else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
