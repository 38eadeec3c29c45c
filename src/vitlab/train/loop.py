"""Training and evaluation of one run: data -> split -> model -> recipe -> run directory.

Reads top to bottom: set up, then one loop over epochs; every epoch ends with a validation pass,
a line in metrics.jsonl and a checkpoint; the run ends with a test pass on the best weights and
final.json.
"""
from __future__ import annotations

import copy
import json
import math
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import rundir
from ..config import RunConfig, dump_yaml
from ..eval.metrics import class_probabilities, classification_metrics
from .augment import BatchAugment, check_dims, match_channels
from . import distributed
from .build import build_model, param_groups
from .distributed import DistInfo
from .feed import make_feed
from .rng import rng_state, seed_everything, set_rng_state

#: what a training checkpoint (``last.pt``) holds besides the weights; resume needs all of it
RESUME_KEYS = ("model", "optimizer", "scheduler", "run", "partial", "rng", "order_gen")


def pick_device(name: str, dinfo: Optional[DistInfo] = None, what: str = "train.device") -> torch.device:
    """``auto`` is a GPU when there is one, else the CPU. Under torchrun, ``auto`` and ``cuda`` give
    each process the GPU of its LOCAL_RANK (``cuda:N`` would put every process on one GPU: refused)."""
    if name == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    try:
        dev = torch.device("cuda" if name == "auto" else name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}={name!r} is not a device vitlab runs on; valid: auto, cpu, cuda, cuda:N")
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise ValueError(f"{what}={name!r} but no CUDA device is available; use {what}=cpu")
    ranks = dinfo is not None and dinfo.enabled
    if ranks and dev.index is not None:
        raise ValueError(f"{what}={name!r} would put all {dinfo.world} torchrun processes on one GPU; use "
                         f"{what}=cuda (each process takes the GPU of its LOCAL_RANK)")
    if dev.index is None:
        dev = torch.device("cuda", dinfo.local_rank if ranks else torch.cuda.current_device())
    torch.cuda.set_device(dev)
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision``: ``auto`` is bf16 autocast on a CUDA device with bf16 support, fp32 elsewhere."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision={precision!r}; valid: auto, fp32, bf16")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast_for(precision: str, device: torch.device) -> Callable[[], object]:
    """A factory of the forward's autocast context for a resolved ``precision``: bf16 autocast on
    ``device``, or none (fp32)."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own streams (dropout, augmentation) in a run of seed ``seed``:
    rank 0 keeps ``seed`` (a single process is unchanged); other ranks are far from every small seed
    (``seed + rank`` made rank 1 of seed 0 draw rank 0 of seed 1's dropout)."""
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**63 if rank else seed


def epoch_order(n: int, repeats: int, gen: torch.Generator) -> torch.Tensor:
    """One epoch's order of the ``n`` training items. With repeated augmentation (Hoffer et al., 2020,
    as DeiT's RASampler and timm's RepeatAugSampler do it): ceil(n / repeats) images in random order,
    each ``repeats`` times in a row, so a batch holds differently augmented copies of the same images,
    and the epoch is still n items long (not ``repeats`` times the compute per epoch)."""
    perm = torch.randperm(n, generator=gen)
    if repeats == 1:
        return perm
    return perm[: -(-n // repeats)].repeat_interleave(repeats)[:n]


def lr_lambda(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> Callable[[int], float]:
    """Linear warm-up from 0 to the base lr over ``warmup_steps`` optimizer steps, then cosine to
    ``min_lr`` (as a factor of the base lr): timm's CosineLRScheduler with its warm-up as a prefix
    (``warmup_prefix=True``, ``warmup_lr_init`` 0), the base lr reached once, at the warm-up's end."""
    floor = min_lr / base_lr

    def f(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


#: later epochs may run slower than the first, which the fit is timed on: on this project's 2-core CPU
#: the Fashion-MNIST preset's first epoch took 32.9 s and its later ones 33.0-37.5 s (35 s typical)
FIT_MARGIN = 1.05


def fit_epochs(planned: int, done: int, elapsed: float, epoch_seconds: float, deadline: float) -> int:
    """How many epochs a schedule under a time limit holds (``train.time_limit_fit``): the ``done``
    ones, plus as many more of ``epoch_seconds`` (x ``FIT_MARGIN``) as fit in the ``deadline -
    elapsed`` seconds left, at least one (the cosine needs steps to come down in; the limit still
    stops the run if that one overruns), at most ``planned``."""
    more = (math.floor(max(0.0, deadline - elapsed) / (epoch_seconds * FIT_MARGIN)) if epoch_seconds > 0
            else planned)
    return max(done + 1, min(planned, done + more)) if done < planned else planned


def set_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, lr_at: Callable[[int], float]) -> None:
    """Give a running LambdaLR another lr curve from its current step on, and set the lr the next
    optimizer step uses from it (LambdaLR computed that one from the old curve)."""
    scheduler.lr_lambdas = [lr_at] * len(scheduler.optimizer.param_groups)
    for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_at(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


class Progress:
    """A tqdm bar on a terminal, plain lines otherwise (logs, CI)."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.enabled, self.tty = enabled, sys.stderr.isatty()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        self.total, self.done, self.desc = total, 0, desc

    def update(self, n: int, **info) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(info, refresh=False)

    def close(self, line: str) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(line, file=sys.stderr, flush=True)


def target_weight(y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_i w_i of a batch's targets: w_y for a hard label, the target's mix of class weights for a
    soft one (MixUp/CutMix mix within the batch, so its sum is the hard labels')."""
    return weight[y].sum() if y.dim() == 1 else (y.float() @ weight).sum()


def train_loss(logits: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor], smoothing: float,
               weight_sum: Optional[float] = None) -> torch.Tensor:
    """Cross-entropy in float32; hard labels get label smoothing, MixUp/CutMix's soft ones carry theirs.

    With class ``weight`` the loss is the weighted mean, sum_i w_i l_i / sum_i w_i, for soft targets
    too (w_i = the target's mix of class weights): torch's own weighted cross-entropy divides by the
    weights' sum for hard labels but by the batch size for soft ones, so a batch's loss would change
    scale with MixUp/CutMix. ``weight_sum`` replaces this batch's sum_i w_i: under DDP, the whole
    batch's over the processes' count, so that the mean of the processes' gradients is the whole
    batch's weighted mean (each slice's own weighted mean, averaged, is not)."""
    if weight is None:
        return F.cross_entropy(logits.float(), y, label_smoothing=smoothing if y.dim() == 1 else 0.0)
    if y.dim() == 1:  # the sum reduction: torch's mean divides this by sum_i w_{y_i}
        total = F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=smoothing, reduction="sum")
    else:
        total = F.cross_entropy(logits.float(), y, weight=weight, reduction="none").sum()  # sum_c w_c y_c (-log p_c)
    return total / (target_weight(y, weight) if weight_sum is None else weight_sum)


class Interrupted(Exception):
    """SIGINT/SIGTERM during training: a checkpoint was saved; ``vitlab train --resume`` continues."""

    def __init__(self, signum: int, run_dir: Path):
        self.signum, self.run_dir = signum, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: checkpoint saved; continue with: vitlab train --resume {run_dir}")


class Diverged(RuntimeError):
    pass


class SignalGuard:
    """SIGINT/SIGTERM set a flag that the loop checks between optimizer steps (so the checkpoint it
    saves is a consistent state). A second Ctrl-C (SIGINT) falls through to the previous handler and
    stops at once; a repeated SIGTERM does not: a scheduler that signals every process of a job
    (Slurm's scancel, preemption) reaches a torchrun worker twice, once itself and once forwarded
    by torchrun, and the worker must still save its checkpoint."""

    def __init__(self):
        self.signum = 0
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a repeated SIGTERM: already stopping
            return
        self.signum = signum
        signal.signal(signal.SIGINT, self.previous[signal.SIGINT])  # a second Ctrl-C stops at once
        print(f"\nvitlab: {signal.Signals(signum).name}: saving a checkpoint at the next step ...",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def read_metrics(path: Path, epochs: Optional[int] = None) -> list:
    """metrics.jsonl lines (a torn last line after a crash is dropped); the first ``epochs`` only."""
    lines = []
    if path.is_file():
        for raw in path.read_text().splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(line, dict):  # damaged like a torn line
                continue
            if epochs is None or line.get("epoch", 0) <= epochs:
                lines.append(line)
    return lines


@torch.no_grad()
def predict(model, feed, augment: BatchAugment, batch_size: int, autocast, dinfo: Optional[DistInfo] = None) -> torch.Tensor:
    """Logits of every item of ``feed`` in order, (N, classes) float32 on the CPU (each rank of a
    distributed run predicts its contiguous share and the shares are gathered)."""
    model.eval()
    n, dinfo = len(feed), dinfo or DistInfo()
    distributed.broadcast_norm_stats(dinfo, model)  # every rank evaluates with what the checkpoint holds
    bounds = [n * r // dinfo.world for r in range(dinfo.world + 1)]
    out = []
    for x, _ in feed.batches(torch.arange(bounds[dinfo.rank], bounds[dinfo.rank + 1]), batch_size):
        with autocast():
            out.append(model(augment.normalize(x)).float())
    logits = torch.cat(out) if out else torch.empty(0)
    counts = [bounds[r + 1] - bounds[r] for r in range(dinfo.world)]
    return distributed.gather_rows(dinfo, logits, counts).cpu()


def norm_stats(d_cfg, model, mcfg: dict, feed, channels: int):
    """(mean, std, where from): the statistics a run normalises its inputs with.

    ``data.norm_stats=auto``: a model loading pretrained weights keeps the statistics it was trained
    with (timm's ``pretrained_cfg``, as timm's own data config does) where they fit its channels;
    otherwise, and with ``split``, the training split's, from 4096 images spread over all of it (the
    first 4096 of a class-ordered folder split would be a few classes' statistics)."""
    if d_cfg.norm_stats == "auto" and mcfg.get("pretrained"):
        pc = getattr(model, "pretrained_cfg", None) or {}
        if len(pc.get("mean") or ()) == channels and len(pc.get("std") or ()) == channels:
            return torch.tensor(pc["mean"]), torch.tensor(pc["std"]), "pretrained weights"
    stats = match_channels(feed.spread(4096), channels).float().div(255).transpose(0, 1).reshape(channels, -1)
    return stats.mean(1), stats.std(1).clamp_min(1e-3), "training split"


def train_run(cfg: RunConfig, out_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into ``out_dir``; returns final.json's content.

    Resumable exactly: a checkpoint holds model, optimizer, scheduler, EMA, the epoch and step within
    it, the epoch's data order and every RNG state, so a run killed at any moment and resumed from
    its last checkpoint ends with the same weights and metrics as one never stopped (same machine
    and thread count). Under torchrun it trains data-parallel (see ``distributed``)."""
    from ..data import dataset_digest, load_dataset, make_splits, split_to_json
    from ..data.splits import check_split

    out_dir = Path(out_dir)
    t_cfg, d_cfg = cfg.train, cfg.data
    if t_cfg.threads:
        torch.set_num_threads(t_cfg.threads)
    dinfo = distributed.from_env()
    device = pick_device(t_cfg.device, dinfo)
    distributed.init(dinfo, device)
    main = dinfo.is_main
    if dinfo.enabled and t_cfg.batch_size % dinfo.world:
        raise ValueError(f"train.batch_size={t_cfg.batch_size} must divide by the {dinfo.world} processes")
    seed_everything(rank_seed(t_cfg.seed, dinfo.rank))  # model init is broadcast from rank 0 by DDP

    # ---- data: uint8 tensors, one stratified split shared by every arm (data.split_seed)
    bundle = load_dataset(d_cfg.name, d_cfg.root, limit=d_cfg.limit, seed=d_cfg.split_seed,
                          pool_test=d_cfg.split == "pooled", **d_cfg.source_options())
    present = bundle.train.labels.unique().tolist()
    if len(present) < 2:  # training would "succeed" at 100% accuracy and report no AUROC
        where = f" under {d_cfg.root}" if d_cfg.root else ""
        found = f"only class {bundle.train.classes[present[0]]!r}" if present else "no images"
        raise ValueError(f"data {d_cfg.name}{where}: {found} in the training data; a classifier needs at least 2")
    split = make_splits(bundle, val_fraction=d_cfg.val_fraction, test_fraction=d_cfg.test_fraction,
                        seed=d_cfg.split_seed, dedupe=d_cfg.dedupe,
                        dedupe_threshold=d_cfg.dedupe_threshold)  # perceptual-hash leakage check first
    train_ds = bundle.train.subset(split["train"])
    val_ds = bundle.train.subset(split["val"])
    test_ds = bundle.test if split["test"] is None else bundle.train.subset(split["test"])
    if resume:  # the run goes on with the data it started with, or not at all
        check_split(out_dir, split, bundle.train.classes, test_ds, pool=bundle.train,
                    doing="resuming would train it on other images and score it on others")
    num_classes = len(bundle.train.classes)
    in_chans, data_size = train_ds.item_shape[0], tuple(train_ds.item_shape[1:])
    check_dims(d_cfg, len(data_size))

    torch.manual_seed(t_cfg.seed)  # identical initial weights on every rank
    model, mcfg = build_model(cfg, in_chans=in_chans, num_classes=num_classes, img_size=data_size)
    model = distributed.sync_batchnorm(dinfo, model.to(device), device)
    torch.manual_seed(rank_seed(t_cfg.seed, dinfo.rank))
    img_size = tuple(mcfg["img_size"]) if mcfg.get("img_size") else data_size
    feed = make_feed(train_ds, device, d_cfg.workers, t_cfg.seed)
    val_feed, test_feed = (make_feed(ds, device, d_cfg.workers, t_cfg.seed) for ds in (val_ds, test_ds))
    y_train = train_ds.labels.to(device)
    channels = mcfg.get("in_chans") or in_chans  # the model's: grey data for a colour model is replicated
    mean, std, norm_from = norm_stats(d_cfg, model, mcfg, feed, channels)
    augment = BatchAugment.from_config(cfg, mean=mean, std=std, num_classes=num_classes, channels=channels,
                                       img_size=img_size if img_size != data_size else None,
                                       seed=rank_seed(t_cfg.seed, dinfo.rank), device=device)
    order_gen = torch.Generator().manual_seed(t_cfg.seed)  # the data order: the same on every rank

    # ---- recipe
    optimizer = torch.optim.AdamW(param_groups(model, t_cfg.weight_decay), lr=t_cfg.lr, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    n_train = len(feed)  # an epoch is one training split long, with repeated augmentation too
    batch = t_cfg.batch_size  # global; each of the world's processes takes batch / world of it
    if n_train < t_cfg.accum_steps * dinfo.world:
        raise ValueError(f"train.accum_steps={t_cfg.accum_steps} needs at least {t_cfg.accum_steps * dinfo.world} "
                         f"training items (one per micro-batch{' and process' if dinfo.enabled else ''}); "
                         f"the training split has {n_train}")
    if n_train < batch * t_cfg.accum_steps:  # a tiny training set: one smaller batch per step
        batch = max(dinfo.world, n_train // t_cfg.accum_steps // dinfo.world * dinfo.world)
        warnings.warn(f"only {n_train} training items: batch size {batch} instead of {t_cfg.batch_size}")
    if t_cfg.warmup_epochs > t_cfg.epochs and not resume:  # a short smoke run of a long preset, typically
        warnings.warn(f"train.warmup_epochs={t_cfg.warmup_epochs:g} is longer than train.epochs={t_cfg.epochs}: the "
                      f"learning rate never reaches train.lr={t_cfg.lr:g} (set train.warmup_epochs lower)")
    per_step = batch * t_cfg.accum_steps
    if (d_cfg.mixup > 0 or d_cfg.cutmix > 0) and (batch // dinfo.world) % 2:  # timm pairs each image with another
        raise ValueError(f"data.mixup/data.cutmix need an even batch per process; train.batch_size={batch}"
                         f"{f' over {dinfo.world} processes' if dinfo.enabled else ''} gives {batch // dinfo.world} "
                         f"(MixUp/CutMix would skip every batch)")
    steps_per_epoch = max(1, n_train // per_step)
    left_over = n_train - steps_per_epoch * per_step  # a whole batch a step: the remainder waits (reshuffled)
    if left_over > 0.1 * n_train and not resume:
        warnings.warn(f"each epoch trains on {steps_per_epoch * per_step} of the {n_train} training items (batches "
                      f"of {per_step}; a different {left_over} left out each epoch): a smaller train.batch_size "
                      f"uses more of them")
    warmup_steps = math.ceil(round(t_cfg.warmup_epochs * steps_per_epoch, 6))  # (round: 0.1 x 30 is 3.0000000000000004)

    def lr_curve(epochs: int) -> Callable[[int], float]:  # the schedule of a run of `epochs` epochs
        return lr_lambda(steps_per_epoch * epochs, warmup_steps, t_cfg.lr, t_cfg.min_lr)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_curve(t_cfg.epochs))
    weight = None
    if t_cfg.class_weighted:  # inverse class frequency, mean 1 (the MRI study's minority-class fix)
        counts = torch.bincount(y_train, minlength=num_classes).float().clamp_min(1)
        weight = (counts.sum() / counts / num_classes).to(device)
    ema = None
    if t_cfg.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=t_cfg.ema)
    precision = resolve_precision(t_cfg.precision, device)
    autocast = autocast_for(precision, device)
    diverge_loss = t_cfg.diverge_loss or 10 * math.log(max(num_classes, 2))
    ddp_model = model
    if dinfo.enabled:
        from torch.nn.parallel import DistributedDataParallel
        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = torch.compile(ddp_model) if t_cfg.compile else ddp_model

    # ---- run directory (rank 0 writes; every rank reads the checkpoint)
    ckpt_dir = out_dir / "checkpoints"
    run = {"epoch": 0, "epochs": t_cfg.epochs, "best_acc": -1.0, "best_epoch": -1, "elapsed": 0.0,
           "patience": t_cfg.early_stop_patience,
           "done": False, "reason": "", "imgs": 0, "train_time": 0.0, "data_time": 0.0}
    partial = None  # the interrupted epoch: its order, the step reached, its running sums
    if resume:
        state = rundir.load_checkpoint(ckpt_dir / "last.pt", need=RESUME_KEYS)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        run.update(state["run"])
        if run["epochs"] != t_cfg.epochs:  # the schedule was fitted to the time limit before the checkpoint
            set_schedule(scheduler, lr_curve(run["epochs"]))
        if state.get("norm"):  # the statistics the run started with, whatever the rule is now
            mean, std = torch.tensor(state["norm"]["mean"]), torch.tensor(state["norm"]["std"])
            norm_from = state["norm"].get("from", "training split")
            augment.set_norm(mean, std)
        partial = state["partial"]
        rngs = state["rng"]
        if len(rngs) != dinfo.world:
            warnings.warn(f"resuming a {len(rngs)}-process run with {dinfo.world}: the random streams differ")
        rng = rngs[min(dinfo.rank, len(rngs) - 1)]
        set_rng_state(rng["global"])
        augment.set_state(rng["augment"])
        order_gen.set_state(state["order_gen"])
        if main:  # drop metrics lines written after this checkpoint (they will be written again)
            kept = read_metrics(out_dir / "metrics.jsonl", run["epoch"])
            rundir.atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in kept))
    elif main:
        rundir.make_dir(out_dir)  # one-line error for a file in the way or an unwritable parent
        # --force over an old run: first mark it unfinished and remove its results, so that a process
        # killed while the new files are written leaves no old final.json passing for this run's
        rundir.set_status(out_dir, "running")
        for stale in ("final.json", "checkpoints/best.pt", "checkpoints/last.pt", "predictions.npz",
                      "attention.npz"):
            (out_dir / stale).unlink(missing_ok=True)
        rundir.atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
        rundir.write_json(out_dir / "env.json", {**rundir.environment(device), "world_size": dinfo.world})
        rundir.write_json(out_dir / "split.json", {**split_to_json(split), "source": bundle.source,
                                                   "classes": bundle.train.classes,
                                                   "test_sha256": dataset_digest(test_ds),
                                                   "pool_sha256": dataset_digest(bundle.train)})
        rundir.atomic_write_text(out_dir / "metrics.jsonl", "")
    if main:
        rundir.set_status(out_dir, "running")
    distributed.require_shared(dinfo, out_dir)  # each rank reads the checkpoints later

    def checkpoint(name: str, partial_state: Optional[dict]) -> None:
        rng = {"global": rng_state(), "augment": augment.get_state()}
        rngs = distributed.gather_objects(dinfo, rng)
        if main:
            rundir.save_checkpoint(ckpt_dir / f"{name}.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
                "run": dict(run), "partial": partial_state, "rng": rngs, "order_gen": order_gen.get_state(),
                "norm": normalization, "world_size": dinfo.world,
                "epochs": run["epochs"], "steps_per_epoch": steps_per_epoch})
        distributed.barrier(dinfo)

    normalization = {"mean": mean.tolist(), "std": std.tolist(), "from": norm_from}
    status = "finished"
    deadline = t_cfg.time_limit_min * 60 if t_cfg.time_limit_min else math.inf
    every = t_cfg.checkpoint_every_min * 60 if t_cfg.checkpoint_every_min else math.inf
    with SignalGuard() as guard:
        for epoch in range(run["epoch"], run["epochs"]):
            if run["done"] or epoch >= run["epochs"]:  # (the schedule may have been fitted shorter since)
                break
            ddp_model.train()
            if partial is not None:
                p, partial = partial, None
                order, step0, sums = p["order"], p["step"], {"grad_norm": 0.0, "steps": 0, **p["sums"]}
                if not main:  # the saved running sums are the whole world's; rank 0 carries them
                    sums.update(loss=0.0, n=0)
            else:
                order = epoch_order(len(feed), d_cfg.repeated_aug, order_gen)
                order, step0 = order[: steps_per_epoch * per_step], 0
                sums = {"loss": 0.0, "n": 0, "seconds": 0.0, "data": 0.0, "grad_norm": 0.0, "steps": 0}
            mine = order.view(-1, batch)[:, dinfo.slice(batch)].reshape(-1)
            batches = feed.batches(mine[step0 * t_cfg.accum_steps * (batch // dinfo.world):], batch // dinfo.world)
            bar = Progress(steps_per_epoch - step0, f"epoch {epoch + 1}/{run['epochs']}", progress and main)
            t0 = t_ckpt = time.perf_counter()
            first_step = 0.0  # this process's first step of the epoch (allocations, kernel choice: slower)
            stop = ""
            step_lr = optimizer.param_groups[0]["lr"]
            for step in range(step0, steps_per_epoch):
                bad = 0.0
                for micro in range(t_cfg.accum_steps):
                    t_data = time.perf_counter()
                    x, y = next(batches)
                    x, y = augment(x, y)
                    sums["data"] += time.perf_counter() - t_data
                    weight_sum = None  # class weights under DDP: the whole batch's sum_i w_i, per process
                    if dinfo.enabled and weight is not None:
                        weight_sum = distributed.all_sum(dinfo, float(target_weight(y, weight)))[0] / dinfo.world
                    # every rank runs every backward pass, whatever its own loss: under DDP the gradient
                    # all-reduces must pair up across ranks (the step's all_max below decides for all);
                    # the gradients are all-reduced once per step, at its last micro-batch (DDP decides in
                    # the forward pass whether the backward syncs: both run under no_sync)
                    with (ddp_model.no_sync() if dinfo.enabled and micro + 1 < t_cfg.accum_steps else nullcontext()):
                        with autocast():
                            logits = step_model(x)
                            loss = train_loss(logits, y, weight, t_cfg.label_smoothing, weight_sum)
                        value = loss.item()
                        if not math.isfinite(value) or value > diverge_loss:
                            bad = value if math.isfinite(value) else math.inf
                        (loss / t_cfg.accum_steps).backward()
                    if not bad:
                        sums["loss"] += value * x.shape[0]
                        sums["n"] += x.shape[0]
                # The (all-reduced) gradient's norm, clipped to train.clip_grad if set: a finite loss can
                # still give a non-finite gradient, which the optimizer step would write into every weight.
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.clip_grad or math.inf))
                spent = time.perf_counter() - t0
                if step == step0:
                    first_step = spent
                # one small all-reduce per step so every rank takes the same decision
                bad, bad_grad, signum, late, due = distributed.all_max(
                    dinfo, bad, float(not math.isfinite(grad_norm)), guard.signum,
                    float(run["elapsed"] + sums["seconds"] + spent > deadline), float(time.perf_counter() - t_ckpt > every))
                if bad or bad_grad:
                    what = ("loss not finite" if math.isinf(bad) else f"loss {bad:.3g} > {diverge_loss:.3g}" if bad
                            else "gradient not finite")
                    run["reason"] = f"diverged: {what} at epoch {epoch + 1} step {step + 1}"
                    status = "diverged"
                    break
                sums["grad_norm"] += grad_norm  # the same on every rank (all-reduced gradients)
                sums["steps"] += 1
                step_lr = optimizer.param_groups[0]["lr"]  # the lr this step used (logged for the epoch's last)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update(model)
                bar.update(1, loss=f"{sums['loss'] / max(1, sums['n']):.4f}",
                           img_s=f"{sums['n'] * dinfo.world / max(spent + sums['seconds'], 1e-9):.0f}",
                           eta=f"{spent / (step + 1 - step0) * (steps_per_epoch - step - 1):.0f}s")
                if late:
                    stop = f"time limit of {t_cfg.time_limit_min} min reached in epoch {epoch + 1}"
                    break
                if step + 1 < steps_per_epoch and (signum or due):
                    now = time.perf_counter()
                    total_loss, total_n = distributed.all_sum(dinfo, sums["loss"], sums["n"])  # all ranks'
                    snap = {**sums, "loss": total_loss, "n": int(total_n), "seconds": sums["seconds"] + now - t0}
                    checkpoint("last", {"order": order, "step": step + 1, "sums": snap})
                    t_ckpt = time.perf_counter()
                    if signum:
                        bar.close(f"epoch {epoch + 1}: interrupted at step {step + 1}/{steps_per_epoch}")
                        if main:
                            rundir.set_status(out_dir, "interrupted", f"signal {int(signum)} at epoch {epoch + 1}")
                        raise Interrupted(int(signum), out_dir)
            epoch_time = sums["seconds"] + time.perf_counter() - t0
            if status == "diverged":
                bar.close(f"epoch {epoch + 1}: {run['reason']}")
                break
            loss_sum, n_seen = distributed.all_sum(dinfo, sums["loss"], sums["n"])
            run["elapsed"] += epoch_time
            run["train_time"] += epoch_time
            run["imgs"] += int(n_seen)
            run["data_time"] += sums["data"]
            eval_model = ema.module if ema is not None else model
            val_logits = predict(eval_model, val_feed, augment, t_cfg.eval_batch_size, autocast, dinfo)
            if not torch.isfinite(val_logits).all():  # the epoch's last steps broke the weights (every rank
                # holds the gathered logits, so all decide alike): as a diverged loss, keep the last good epoch
                run["reason"] = f"diverged: validation logits not finite after epoch {epoch + 1}"
                status = "diverged"
                bar.close(f"epoch {epoch + 1}: {run['reason']}")
                break
            val = classification_metrics(val_logits, val_ds.labels, num_classes)
            line = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, n_seen), "val_loss": val["loss"],
                    "val_acc": val["acc1"], "lr": step_lr,
                    "grad_norm": sums["grad_norm"] / max(1, sums["steps"]),  # mean over the steps, before clipping
                    "seconds": epoch_time,
                    "img_s": n_seen / max(epoch_time, 1e-9), "elapsed": run["elapsed"],
                    "data_share": sums["data"] / max(epoch_time, 1e-9)}  # host time getting and augmenting batches
            if main:
                rundir.append_jsonl(out_dir / "metrics.jsonl", line)
            run["epoch"] = epoch + 1
            improved = val["acc1"] > run["best_acc"]
            if improved:
                run["best_acc"], run["best_epoch"] = val["acc1"], epoch + 1
                run["patience"] = t_cfg.early_stop_patience
                checkpoint("best", None)
            elif run["patience"] is not None:
                run["patience"] -= 1
            if stop:
                run["done"], run["reason"] = True, stop
            elif run["patience"] is not None and run["patience"] <= 0:
                run["done"] = True
                run["reason"] = f"early stop: no val_acc improvement for {t_cfg.early_stop_patience} epochs"
            elif t_cfg.time_limit_fit and t_cfg.time_limit_min and epoch == 0 and run["epochs"] > 1:
                steps_here = steps_per_epoch - step0  # this process's steps, timed without its first
                per_epoch = ((epoch_time - sums["seconds"] - first_step) / (steps_here - 1) * steps_per_epoch
                             if steps_here > 1 else epoch_time)
                # the slowest rank's epoch and clock (each rank's own differ by a little), so that every
                # rank fits the same schedule: ranks with different ones would wait on each other for ever
                per_epoch, elapsed = distributed.all_max(dinfo, per_epoch, run["elapsed"])
                fitted = fit_epochs(run["epochs"], 1, elapsed, per_epoch, deadline)
                if fitted < run["epochs"]:
                    set_schedule(scheduler, lr_curve(fitted))
                    run["epochs"] = fitted
                    run["fitted"] = f"schedule fitted to the time limit: {fitted} of {t_cfg.epochs} epochs"
                    bar.close(f"{run['fitted']} (an epoch trains in {per_epoch:.1f} s); the learning rate now "
                              f"reaches train.min_lr at epoch {fitted}")
            checkpoint("last", None)
            bar.close(f"epoch {epoch + 1}/{run['epochs']}  train_loss {line['train_loss']:.4f}  "
                      f"val_loss {val['loss']:.4f}  val_acc {val['acc1']:.4f}{' *' if improved else ''}  "
                      f"{line['img_s']:.0f} img/s  {epoch_time:.1f}s  data {line['data_share']:.1%}")
            signum = int(distributed.all_max(dinfo, guard.signum)[0])  # every rank stops, or none
            if signum and epoch + 1 < run["epochs"] and not run["done"]:
                if main:
                    rundir.set_status(out_dir, "interrupted", f"signal {signum} after epoch {epoch + 1}")
                raise Interrupted(signum, out_dir)

    if run["best_epoch"] < 0:  # diverged before any epoch finished: nothing to evaluate
        if main:
            rundir.set_status(out_dir, status if status == "diverged" else "failed", run["reason"])
        raise Diverged(f"run {out_dir} {run['reason']}; no epoch finished, so no checkpoint was kept")
    final = evaluate_run(out_dir, cfg, model, augment, test_feed, test_ds, num_classes, device, autocast,
                         mcfg, dinfo)
    train_time = run["train_time"]
    final.update(epochs=run["epoch"], best_epoch=run["best_epoch"], seconds=run["elapsed"],
                 train_images_per_s=run["imgs"] / train_time if train_time else None,
                 data_share=run["data_time"] / train_time if train_time else None, precision=precision, status=status,
                 reason=run["reason"] or run.get("fitted", ""), planned_epochs=t_cfg.epochs,
                 world_size=dinfo.world, normalization=normalization)
    if main:
        rundir.write_json(out_dir / "final.json", final)
        rundir.set_status(out_dir, status, run["reason"])
    distributed.barrier(dinfo)
    if status == "diverged":
        raise Diverged(f"run {out_dir} {run['reason']}; the last good checkpoint is kept and its best epoch "
                       f"evaluated in final.json")
    return final


def evaluate_run(out_dir, cfg, model, augment, test_feed, test_ds, num_classes, device, autocast, mcfg,
                 dinfo: Optional[DistInfo] = None) -> dict:
    """Test metrics of the best checkpoint, plus cost figures and the report's probes (``eval.*``):
    predictions.npz (labels, class probabilities), accuracy at other resolutions, attention.npz."""
    from ..flops import flop_counter

    from ..eval import probes

    dinfo = dinfo or DistInfo()
    out_dir = Path(out_dir)
    state = rundir.load_checkpoint(out_dir / "checkpoints" / "best.pt")
    model.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    bs = cfg.train.eval_batch_size
    test_labels = test_ds.labels
    logits = predict(model, test_feed, augment, bs, autocast, dinfo)
    metrics = classification_metrics(logits, test_labels, num_classes)
    e_cfg = cfg.eval
    if e_cfg.predictions and dinfo.is_main:
        probes.save_npz(out_dir / "predictions.npz", labels=test_labels.numpy().astype(np.int64),
                        probs=class_probabilities(logits))
    img_size = tuple(mcfg.get("img_size") or test_ds.item_shape[1:])
    patch = mcfg.get("patch_size") or (1,) * len(img_size)
    patch = tuple(patch) if isinstance(patch, (list, tuple)) else (patch,) * len(img_size)
    heights = probes.auto_resolutions(img_size, patch) if e_cfg.resolutions == "auto" else list(e_cfg.resolutions)
    if heights and len(img_size) == 2:
        n = min(len(test_ds), e_cfg.resolution_images)
        sub = test_ds.subset(torch.arange(n))
        sub_feed = make_feed(sub, device, cfg.data.workers, cfg.train.seed)

        def predict_at(size):
            resize = copy.copy(augment)  # the same normalisation, another output size
            resize.img_size = tuple(size)
            return predict(model, sub_feed, resize, bs, autocast, dinfo)

        metrics["resolution"] = probes.resolution_sweep(predict_at, sub.labels, heights, img_size, patch, num_classes)
        metrics["resolution_images"] = n
    if e_cfg.attention_images and dinfo.is_main and len(img_size) == 2:
        idx = probes.pick_one_per_class(test_labels, e_cfg.attention_images)
        raw = make_feed(test_ds.subset(idx), device, 0, cfg.train.seed).sample(len(idx))
        model.eval()
        with autocast():
            maps = probes.attention_summary(model, augment.normalize(raw))
        if maps is not None:
            probes.save_npz(out_dir / "attention.npz", images=raw.cpu().numpy(), maps=maps,
                            labels=test_labels[idx].numpy().astype(np.int64))
    x = augment.normalize(test_feed.sample(bs))
    model.eval()
    with torch.no_grad(), autocast():  # timed in the run's precision, as it trained and was evaluated
        with flop_counter() as counter:  # per image in an evaluation batch: what a forward pass costs once
            model(x)                        # (STRING's P, the PE tables) is shared by the batch, as in use
        times = []
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    metrics.update(params=sum(p.numel() for p in model.parameters()), flops=counter.get_total_flops() / x.shape[0],
                   infer_ms_per_batch=sorted(times)[len(times) // 2] * 1e3, infer_batch=x.shape[0],
                   test_size=len(test_feed), model=mcfg)
    return metrics
