"""Run configuration: typed, frozen sections ``data``, ``model``, ``train``, ``eval``.

A run is described by a YAML file (or a preset name from ``configs/``) plus ``key=value``
overrides with dotted keys (``train.lr=3e-4``, ``model.qk_pe=rope_mixed``,
``model.qk_pe_kwargs.sparsity=0.5``). Unknown keys and wrong types are rejected with one line that
names the key and the valid ones. The resolved config is written into every run directory.
"""
from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .models import SIZES, ModelConfig, make_config
from .models.config import NumbersNotBools, one_line_error

PRESET_DIR = Path(str(resources.files("vitlab") / "configs"))
MAX_SEED = 2**63 - 1  # torch.manual_seed's range (a larger one fails deep in a run)


class DataSection(NumbersNotBools):
    # allow_inf_nan=False: a bound like ge=0 lets inf through, which crashes or poisons training later
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str = "fashion-mnist"
    root: Optional[str] = None
    limit: Optional[int] = Field(None, ge=1, description="use at most N training images, stratified")
    val_fraction: float = Field(0.1, gt=0, lt=1)
    split: Literal["official", "pooled"] = Field(
        "official", description="official: a dataset's own test set (Testing/, test/, val/, t10k, ...) is the test "
        "set and val is carved from its training set; pooled: its training and test sets are pooled and split "
        "stratified (1 - val_fraction - test_fraction)/val_fraction/test_fraction")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="test share of the split when there is no official "
                                 "test set to use (data.split=pooled, or a dataset without one)")
    split_seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the stratified split: the same for every arm and seed of a comparison")
    dedupe: bool = Field(False, description="drop perceptual-hash near-duplicates from the pool before splitting "
                         "(the official test set is kept whole); the leakage check runs either way")
    dedupe_threshold: int = Field(4, ge=0, le=16, description="near-duplicate: pHash Hamming distance <= this")
    options: Dict[str, Any] = Field(default_factory=dict, description="source-specific options")
    on_bad_image: Literal["skip", "fail"] = Field(
        "skip", description="a corrupt or non-image file in an image folder: skip it (counted warning) or fail")
    norm_stats: Literal["auto", "split"] = Field(
        "auto", description="input normalisation: auto = a model loading pretrained weights keeps the statistics "
        "they were trained with (timm's pretrained_cfg), any other the training split's; split = always the "
        "training split's")
    workers: int = Field(2, ge=0, description="DataLoader workers for streamed (file-backed) datasets")
    # batched, on-device augmentation
    hflip: bool = False
    crop_pad: int = Field(0, ge=0, description="pad-and-random-crop by up to this many pixels")
    auto_augment: Literal["none", "autoaugment", "randaugment"] = Field(
        "none", description="torchvision v2's AutoAugment (policy: data.auto_augment_policy) or RandAugment "
        "(data.randaugment_ops operations at magnitude data.randaugment_magnitude), one draw per image")
    auto_augment_policy: Literal["cifar10", "imagenet", "svhn"] = Field(
        "cifar10", description="AutoAugment's learned policy: the one searched on CIFAR-10, ImageNet or SVHN")
    randaugment_ops: int = Field(2, ge=1, le=14, description="RandAugment: operations per image")
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="RandAugment: magnitude of each operation "
                                       "(0-30, torchvision's 31 bins)")
    affine_degrees: float = Field(0.0, ge=0, le=180, description="RandomAffine rotation range (+-degrees)")
    affine_translate: float = Field(0.0, ge=0, le=1, description="RandomAffine shift, fraction of the size")
    affine_scale: Tuple[float, float] = (1.0, 1.0)
    mixup: float = Field(0.0, ge=0, description="MixUp alpha (0 = off)")
    cutmix: float = Field(0.0, ge=0, description="CutMix alpha (0 = off)")
    mix_prob: float = Field(1.0, ge=0, le=1)
    random_erasing: float = Field(0.0, ge=0, le=1, description="RandomErasing probability")
    repeated_aug: int = Field(1, ge=1, description="repeated augmentation (DeiT's RASampler): each batch holds this "
                              "many differently augmented copies of its images; an epoch stays one training split "
                              "long, so it draws 1/N of the images")

    @field_validator("root")
    @classmethod
    def _absolute_root(cls, value):
        # config.yaml records where the data was: a relative path would name another folder to an eval or
        # a --resume started elsewhere (other data, were that folder to hold some)
        return None if value is None else str(Path(value).expanduser().absolute())

    @field_validator("options")
    @classmethod
    def _absolute_class_list(cls, value):
        classes = value.get("classes")  # an image folder's class list file, for the same reason as root
        if isinstance(classes, str) and classes:
            value = {**value, "classes": str(Path(classes).expanduser().absolute())}
        return value

    @field_validator("affine_scale")
    @classmethod
    def _scale_range(cls, value):
        low, high = value
        if not 0 < low <= high:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return value

    def source_options(self) -> Dict[str, Any]:
        """The options passed to the data source: ``options`` plus ``on_bad_image`` where the
        source takes it."""
        from .data import DATASETS

        opts = dict(self.options)
        if "on_bad_image" in DATASETS.options(self.name) and "on_bad_image" not in opts:
            opts["on_bad_image"] = self.on_bad_image
        return opts


class TrainSection(NumbersNotBools):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # as DataSection

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0, le=1e6)  # (bounded: x steps per epoch, it must stay a number)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighted: bool = False
    clip_grad: Optional[float] = Field(None, gt=0)  # DeiT/timm clip nothing by default; a preset may
    accum_steps: int = Field(1, ge=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    time_limit_min: Optional[float] = Field(None, gt=0, description="stop training after this many minutes "
                                            "of training steps, then evaluate the best epoch (None = no limit)")
    time_limit_fit: bool = Field(False, description="under time_limit_min (without one it does nothing): after "
                                 "the first epoch, shorten the schedule to the epochs the limit leaves time for, so "
                                 "the cosine still ends at min_lr (a run cut by the limit alone stops with its lr "
                                 "still high)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 = autocast; auto = bf16 on a CUDA device that supports it, fp32 elsewhere "
        "(on CPU, bf16 must be asked for)")
    compile: bool = False
    ema: Optional[float] = Field(None, gt=0, lt=1, description="EMA decay of the weights (None = off)")
    early_stop_patience: Optional[int] = Field(None, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="auto (CUDA when there is one, else CPU), cpu, cuda, cuda:N or mps")
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = torch's default)")
    checkpoint_every_min: float = Field(10.0, ge=0, description="also checkpoint mid-epoch this often "
                                        "(minutes; 0 = at epoch ends only); resume replays from there exactly")
    diverge_loss: Optional[float] = Field(None, gt=0, description="stop as diverged when a batch loss exceeds "
                                          "this (None = 10 x ln(classes), ten times chance level)")


class EvalSection(NumbersNotBools):
    """What a run measures on its test set after training, besides final.json's metrics: the
    inputs of the comparison report's ROC curves, resolution-extrapolation curves and attention maps."""
    model_config = ConfigDict(extra="forbid", frozen=True)

    resolutions: Union[Literal["auto"], List[Annotated[int, Field(ge=1)]]] = Field(
        "auto", description="image sizes (shorter side, px) to evaluate the trained model at: test images are "
        "resized, relative PEs read the new grid, learned tables are resized; 'auto' = 0.5x..1.5x the training "
        "size rounded to the patch (2D models); [] = off")
    resolution_images: int = Field(2000, ge=1, description="test images used for each resolution (the first N)")
    attention_images: int = Field(4, ge=0, description="test images (one per class) whose last-block attention "
                                  "is saved in attention.npz (vit models; 0 = off)")
    predictions: bool = Field(True, description="save the test set's labels and class probabilities in "
                              "predictions.npz (ROC curves)")

    @field_validator("resolutions")
    @classmethod
    def _unique(cls, value):
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError("lists a size twice")
        return value


MODEL_EXTRA = ("name", "size", "pretrained")


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataSection = Field(default_factory=DataSection)
    model: Dict[str, Any] = Field(default_factory=dict)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    def model_cfg(self, **derived) -> ModelConfig:
        """The vit model config: preset ``size``, the data-derived values (``derived``), then the
        explicit model keys."""
        keys = {k: v for k, v in self.model.items() if k not in MODEL_EXTRA}
        return make_config(self.model.get("size"), **{**derived, **keys})

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


def parse_overrides(items: List[str]) -> Dict[str, Any]:
    """``["train.lr=3e-4", "model.qk_pe=pope"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: Dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key or "." not in key:
            raise ValueError(f"override {item!r} is not section.key=value (e.g. train.lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and not raw.lstrip().startswith(("'", '"')):  # YAML 1.1 reads 3e-4 as a string;
            # a quoted value ('"2024"', a folder named 2024) stays text
            try:
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override of {p!r}")
        if isinstance(node.get(parts[-1]), dict) and not isinstance(value, dict):  # (train.lr.x=2 train.lr=1)
            raise ValueError(f"override {item!r} conflicts with another override of keys under {key!r}")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    """Merge nested dicts, ``extra`` winning. A model section that names a different
    ``model.name`` (say ``timm:resnet18`` over a vit preset) replaces the base's model keys
    instead of inheriting vit-only ones; a data section that names another source drops the base's
    ``data.options`` (they belong to the other source)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if (k == "model" and isinstance(v, dict) and isinstance(out.get(k), dict)
                and v.get("name", out[k].get("name", "vit")) != out[k].get("name", "vit")):
            out[k] = copy.deepcopy(v)
        elif (k == "data" and isinstance(v, dict) and isinstance(out.get(k), dict)
              and v.get("name", out[k].get("name")) != out[k].get("name")):
            out[k] = deep_merge({key: val for key, val in out[k].items() if key != "options"}, v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def presets() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping. PyYAML keeps the last silently (it has
    no option for this), so `train:` written twice would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys: SafeLoader's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: Path, what: str):
    """The parsed YAML of ``path`` ({} for an empty file); one-line errors for a missing file or bad YAML."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} file {path} is a directory; give a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with path.open(encoding="utf-8") as stream:  # a stream, so that YAML's messages name the file
            return yaml.load(stream, Loader=_StrictLoader) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None


def beside(ref, path: Path):
    """A ``base:`` reference as written in the YAML file ``path``: the file it names relative to that
    file's folder when there is one (a config next to the file that extends it, wherever the command
    runs from), else ``ref`` as given (a preset name, or a path from the current directory)."""
    if isinstance(ref, str) and ref and not Path(ref).is_absolute() and (Path(path).parent / ref).is_file():
        return str(Path(path).parent / ref)
    return ref


def read_yaml(source: str, _chain: Tuple[str, ...] = ()) -> dict:
    """A preset name (``fashion-mnist``, ``fashion-mnist-quick``) or a path to a YAML file."""
    if not isinstance(source, (str, Path)) or not str(source):  # e.g. `base: 3` or `base: [a]` in a YAML file
        raise ValueError(f"config {source!r} is not a preset name or a path; valid presets: {', '.join(presets())}")
    path = Path(source)
    if not path.suffix and not path.exists():
        path = PRESET_DIR / f"{source}.yaml"
        if not path.exists():
            from .compare.experiment import studies

            if source in studies():
                raise ValueError(f"{source!r} is a study (an experiment), not a run config preset: run it with "
                                 f"`vitlab compare {source}`, or check it with `vitlab compare {source} --dry-run`")
            raise ValueError(f"unknown preset {source!r}; valid: {', '.join(presets())} (or a path to a .yaml file)")
    here = str(path.resolve())
    if here in _chain:
        raise ValueError(f"{path}: its chain of `base:` configs leads back to itself")
    data = load_yaml_file(path, "config")
    if data == {}:  # the built-in defaults alone are no recipe (and not a valid model for their data)
        raise ValueError(f"{path}: an empty config; give `base: PRESET` and the keys to change (presets: "
                         f"{', '.join(presets())}), or data/model/train sections")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with data/model/train sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:  # a preset may extend another: `base: fashion-mnist`
        data = deep_merge(read_yaml(beside(base, path), (*_chain, here)), data)
    return data


def load_config(source: Optional[str] = None, overrides: Optional[List[str]] = None) -> RunConfig:
    """Resolve a preset or YAML plus overrides into a validated :class:`RunConfig`."""
    raw = read_yaml(source) if source else {}
    if "arms" in raw:  # the other kind of YAML: say so rather than list its keys as unknown
        raise ValueError(f"{source} is an experiment (it has 'arms'), not a run config: run it with "
                         f"`vitlab compare {source}`, or check it with `vitlab compare {source} --dry-run`")
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return validate(raw)


def _check_names(key: str, registry, name, options_key: str, options) -> None:
    """``name`` registered (else a one-line ValueError led by ``key``), taking every one of
    ``options`` and, where the entry has a check, with valid values (else one led by ``options_key``)."""
    for where, check in ((key, lambda: registry.get(name)),
                         (options_key, lambda: registry.check_values(name, options))):
        try:
            check()
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def _check_data_source(data: DataSection) -> None:
    """The data source and its option names, checked with the rest of the config rather than when the
    data loads: `vitlab validate` and a comparison's up-front check then refuse them before any run
    (or cluster job) starts. So are the options' values, where the source has a check that reads no
    data (``DATASETS.register(..., check=...)``)."""
    from .data import DATASETS

    options = data.source_options() if data.name in DATASETS else data.options  # an unknown name fails first
    _check_names("data.name", DATASETS, data.name, "data.options", options)


def _data_size(data: DataSection) -> Optional[tuple]:
    """The image size the data will have, where the source can tell without reading it (None else)."""
    from .data import DATASETS

    return DATASETS.item_size(data.name, data.source_options())


def _check_timm(model: dict) -> None:
    """A ``timm:`` model's name, and the names and option names of the q/k PE and kernel vitlab puts
    in it (their values and shapes are checked when the model is built, once its sizes are known)."""
    from .models.kernels import KERNELS
    from .models.qk_base import QK_PES
    from .models.timm_insert import check_timm_model

    try:
        check_timm_model(str(model["name"]).removeprefix("timm:"))
    except ValueError as err:
        raise ValueError(f"model.name: {err}") from None
    for key, registry, default in (("qk_pe", QK_PES, "none"), ("attn", KERNELS, "standard")):
        name, options = model.get(key, default), model.get(f"{key}_kwargs") or {}
        if not isinstance(name, str):
            raise ValueError(f"model.{key}={name!r}; valid: {', '.join(registry.names())}")
        if not isinstance(options, dict):
            raise ValueError(f"model.{key}_kwargs={options!r}; expected a mapping (option: value)")
        _check_names(f"model.{key}", registry, name, f"model.{key}_kwargs", options)
    _check_timm_build(model)


def _check_timm_build(model: dict) -> None:
    """Build the ``timm:`` model on the meta device (no memory, no weights) with the config's keys,
    and put vitlab's q/k PE and kernel in when asked: a key the model does not take, or a PE for a
    model that is not a ViT, is a one-line error now rather than a failed run after the data loaded.
    Only those two answers count here: other build errors (a size that only the data settles) are
    left to the real build, which checks everything again."""
    import timm
    import torch

    from .models.timm_insert import insert_qk_pe, timm_kwargs

    name = str(model["name"]).removeprefix("timm:")
    kwargs = timm_kwargs(model)
    try:
        with torch.device("meta"):
            built = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:
        raise ValueError(f"timm model {name!r} does not take {sorted(kwargs)}: {err}") from None
    except Exception:  # noqa: BLE001 - left to the real build (see above)
        return
    if model.get("qk_pe", "none") != "none" or model.get("attn", "standard") != "standard":
        try:
            with torch.device("meta"):
                insert_qk_pe(built, model.get("qk_pe", "none"), model.get("qk_pe_kwargs"),
                             model.get("attn", "standard"), model.get("attn_kwargs"))
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 - left to the real build
            return


def _check_keys(node, where: str = "") -> None:
    """Every mapping key is text: YAML reads `3:` or `0.5:` as a number, which would otherwise fail
    deep inside the validation with a TypeError."""
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                raise ValueError(f"config key {where}{key!r} must be text (quote it in YAML: '{key}')")
            _check_keys(value, f"{where}{key}.")


def _check_resolutions(resolutions, patch) -> None:
    """An explicit eval.resolutions list must be heights the model can take (whole patches, 2D):
    otherwise each size fails only after training, recorded in final.json."""
    if resolutions == "auto" or not resolutions:
        return
    if len(patch) != 2:
        raise ValueError(f"eval.resolutions={resolutions}: resolution sweeps are for 2D models; use [] (or auto) "
                         f"for volumes")
    bad = [r for r in resolutions if r % patch[0]]
    if bad:
        raise ValueError(f"eval.resolutions {bad} not divisible by the patch height {patch[0]} "
                         f"(model.patch_size={list(patch)})")


def validate(raw: dict) -> RunConfig:
    if not isinstance(raw, dict):
        raise ValueError(f"a run config is a mapping with data/model/train/eval sections, got {type(raw).__name__}")
    _check_keys(raw)
    try:
        cfg = RunConfig(**raw)
    except ValidationError as err:
        raise ValueError(f"invalid config: {one_line_error(err, RunConfig)}") from None
    if cfg.train.min_lr > cfg.train.lr:
        raise ValueError(f"train.min_lr={cfg.train.min_lr} is above train.lr={cfg.train.lr}: the schedule decays "
                         f"from lr to min_lr")
    if cfg.data.split == "pooled" and cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ValueError(f"data.val_fraction + data.test_fraction = {cfg.data.val_fraction:g} + "
                         f"{cfg.data.test_fraction:g} leaves nothing to train on (data.split=pooled); they must "
                         f"sum below 1")
    _check_data_source(cfg.data)
    name = cfg.model.get("name", "vit")
    if name == "vit":
        unknown = sorted(set(cfg.model) - set(ModelConfig.model_fields) - set(MODEL_EXTRA))
        if unknown:
            raise ValueError(f"unknown key(s) {['model.' + k for k in unknown]}; valid: "
                             f"{', '.join('model.' + k for k in (*MODEL_EXTRA, *ModelConfig.model_fields))}")
        if cfg.model.get("pretrained") not in (None, False):  # run directories must say how a model was trained
            raise ValueError(f"model.pretrained={cfg.model['pretrained']!r} applies to timm models "
                             f"(model.name=timm:NAME); vitlab's own ViT (model.name=vit) trains from scratch")
        # image size, channels and classes come from the data when not given: check the rest now,
        # with the data's image size where its source knows it from the options (as training will
        # use it), else a stand-in that any patch size divides
        size = cfg.model.get("size")
        preset = SIZES.get(size, {}) if isinstance(size, str) else {}  # make_config names a bad size
        derived = {"in_chans": 3, "num_classes": 10}
        data_size = None if "img_size" in cfg.model else _data_size(cfg.data)
        if data_size is not None:
            derived["img_size"] = data_size
        elif "img_size" not in cfg.model and "img_size" not in preset:
            patch = cfg.model.get("patch_size", preset.get("patch_size", 16))
            if isinstance(patch, int):
                derived["img_size"] = 4 * patch
            elif isinstance(patch, (list, tuple)) and all(isinstance(p, int) for p in patch):
                derived["img_size"] = tuple(4 * p for p in patch)
            # else (null, text, ...): no stand-in; the model config names the bad patch_size
        mcfg = cfg.model_cfg(**derived)
        _check_resolutions(cfg.eval.resolutions, mcfg.patch_size)
        from .train.augment import check_dims  # (training checks the data's own dimensionality again)

        check_dims(cfg.data, len(mcfg.img_size))  # 2D-only augmentation of volumes: before any run starts
    elif str(name).startswith("timm:"):
        _check_timm(cfg.model)
    else:
        raise ValueError(f"model.name={name!r}; valid: 'vit' or 'timm:<model name>' (e.g. timm:resnet18)")
    return cfg


def with_defaults(raw: dict) -> dict:
    """A saved run config (config.yaml, a comparison's configs/NAME.yaml) with the data/train/eval
    keys it lacks at their defaults: one written before vitlab had a key reads as it trained, since a
    new key's default keeps the old behaviour. For comparing saved configs with each other or with a
    config now, without validating them again (the model section holds only the keys given)."""
    out = dict(raw)
    for name, section in (("data", DataSection), ("train", TrainSection), ("eval", EvalSection)):
        given = out.get(name)
        if isinstance(given, dict):
            out[name] = {**given, **{k: v for k, v in section().model_dump(mode="json").items() if k not in given}}
    return out


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
