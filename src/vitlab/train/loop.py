"""Training and evaluation of one run: data -> split -> model -> recipe -> run directory.

Reads top to bottom: set up, then one loop over epochs; every epoch ends with a validation pass,
a line in metrics.jsonl and a checkpoint; the run ends with a test pass on the best weights and
final.json.
"""
from __future__ import annotations

import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .. import rundir
from ..config import RunConfig, dump_yaml
from ..eval.metrics import classification_metrics
from .augment import BatchAugment, match_channels
from .build import build_model, param_groups
from .feed import make_feed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device={name!r} is not a device; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    return dev


def lr_lambda(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> Callable[[int], float]:
    """Linear warm-up to the base lr, then cosine to ``min_lr`` (as a factor of the base lr)."""
    floor = min_lr / base_lr

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


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


@torch.no_grad()
def predict(model, feed, augment: BatchAugment, batch_size: int, autocast) -> torch.Tensor:
    """Logits of every item of ``feed`` in order, (N, classes) float32 on the CPU."""
    model.eval()
    out = []
    for x, _ in feed.batches(torch.arange(len(feed)), batch_size):
        with autocast():
            out.append(model(augment.normalize(x)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def train_run(cfg: RunConfig, out_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` into ``out_dir``; returns final.json's content. Resumable at epoch boundaries."""
    from ..data import load_dataset, make_splits, split_to_json

    out_dir = Path(out_dir)
    t_cfg, d_cfg = cfg.train, cfg.data
    if t_cfg.threads:
        torch.set_num_threads(t_cfg.threads)
    device = pick_device(t_cfg.device)
    seed_everything(t_cfg.seed)

    # ---- data: uint8 tensors, one stratified split shared by every arm (data.split_seed)
    bundle = load_dataset(d_cfg.name, d_cfg.root, limit=d_cfg.limit, seed=d_cfg.split_seed, **d_cfg.source_options())
    split = make_splits(bundle, val_fraction=d_cfg.val_fraction, seed=d_cfg.split_seed)
    train_ds = bundle.train.subset(split["train"])
    val_ds = bundle.train.subset(split["val"])
    test_ds = bundle.test if split["test"] is None else bundle.train.subset(split["test"])
    num_classes = len(bundle.train.classes)
    in_chans, data_size = train_ds.item_shape[0], tuple(train_ds.item_shape[1:])

    model, mcfg = build_model(cfg, in_chans=in_chans, num_classes=num_classes, img_size=data_size)
    model.to(device)
    img_size = tuple(mcfg["img_size"]) if mcfg.get("img_size") else data_size
    feed = make_feed(train_ds, device, d_cfg.workers, t_cfg.seed)
    val_feed, test_feed = (make_feed(ds, device, d_cfg.workers, t_cfg.seed) for ds in (val_ds, test_ds))
    y_train = train_ds.labels.to(device)
    channels = mcfg.get("in_chans") or in_chans  # the model's: grey data for a colour model is replicated
    stats = match_channels(feed.sample(4096), channels).float().div(255).transpose(0, 1).reshape(channels, -1)
    mean, std = stats.mean(1), stats.std(1).clamp_min(1e-3)
    augment = BatchAugment(mean=mean, std=std, num_classes=num_classes, hflip=d_cfg.hflip, crop_pad=d_cfg.crop_pad,
                           mixup=d_cfg.mixup, cutmix=d_cfg.cutmix, mix_prob=d_cfg.mix_prob,
                           random_erasing=d_cfg.random_erasing, auto_augment=d_cfg.auto_augment,
                           affine_degrees=d_cfg.affine_degrees, affine_translate=d_cfg.affine_translate,
                           affine_scale=d_cfg.affine_scale, channels=channels,
                           label_smoothing=t_cfg.label_smoothing,
                           img_size=img_size if img_size != data_size else None, seed=t_cfg.seed, device=device)

    # ---- recipe
    optimizer = torch.optim.AdamW(param_groups(model, t_cfg.weight_decay), lr=t_cfg.lr, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    n_train = len(feed) * d_cfg.repeated_aug
    steps_per_epoch = max(1, n_train // (t_cfg.batch_size * t_cfg.accum_steps))
    total = steps_per_epoch * t_cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total, int(t_cfg.warmup_epochs * steps_per_epoch), t_cfg.lr, t_cfg.min_lr))
    weight = None
    if t_cfg.class_weighted:  # inverse class frequency, mean 1 (the MRI study's minority-class fix)
        counts = torch.bincount(y_train, minlength=num_classes).float().clamp_min(1)
        weight = (counts.sum() / counts / num_classes).to(device)
    ema = None
    if t_cfg.ema:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=t_cfg.ema)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if t_cfg.precision == "bf16"
                else nullcontext)
    step_model = torch.compile(model) if t_cfg.compile else model

    # ---- run directory
    ckpt_dir = out_dir / "checkpoints"
    start_epoch, best_acc, best_epoch, elapsed = 0, -1.0, -1, 0.0
    if resume:
        state = rundir.load_checkpoint(ckpt_dir / "last.pt")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        start_epoch, best_acc, best_epoch, elapsed = state["epoch"], state["best_acc"], state["best_epoch"], state["elapsed"]
        torch.set_rng_state(state["rng"]["torch"])
        augment.gen.set_state(state["rng"]["augment"])
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
        rundir.write_json(out_dir / "env.json", rundir.environment(device))
        rundir.write_json(out_dir / "split.json", {**split_to_json(split), "source": bundle.source,
                                                   "classes": bundle.train.classes})
        (out_dir / "metrics.jsonl").write_text("")
    rundir.set_status(out_dir, "running")

    def checkpoint(name: str, epoch: int) -> None:
        rundir.save_checkpoint(ckpt_dir / f"{name}.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None, "epoch": epoch, "best_acc": best_acc,
            "best_epoch": best_epoch, "elapsed": elapsed, "norm": {"mean": mean.tolist(), "std": std.tolist()},
            "rng": {"torch": torch.get_rng_state(), "augment": augment.gen.get_state()}})

    status, reason = "finished", ""
    patience_left = t_cfg.early_stop_patience
    deadline = t_cfg.time_limit_min * 60 if t_cfg.time_limit_min else math.inf
    imgs_seen, train_time, data_total = 0, 0.0, 0.0
    epoch = start_epoch
    for epoch in range(start_epoch, t_cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(feed), generator=augment.gen).repeat(d_cfg.repeated_aug)
        order = order[torch.randperm(order.numel(), generator=augment.gen)] if d_cfg.repeated_aug > 1 else order
        batches = feed.batches(order[: steps_per_epoch * t_cfg.accum_steps * t_cfg.batch_size], t_cfg.batch_size)
        bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{t_cfg.epochs}", progress)
        loss_sum, n_seen, stop, data_time = 0.0, 0, False, 0.0
        for step in range(steps_per_epoch):
            for micro in range(t_cfg.accum_steps):
                t_data = time.perf_counter()
                x, y = next(batches)
                x, y = augment(x, y)
                data_time += time.perf_counter() - t_data
                with autocast():
                    logits = step_model(x)
                    loss = F.cross_entropy(logits.float(), y, weight=weight,
                                           label_smoothing=t_cfg.label_smoothing if y.dim() == 1 else 0.0)
                if not torch.isfinite(loss):
                    status, reason, stop = "failed", f"diverged: loss is {loss.item()} at epoch {epoch + 1} step {step + 1}", True
                    break
                (loss / t_cfg.accum_steps).backward()
                loss_sum += loss.item() * x.shape[0]
                n_seen += x.shape[0]
            if stop:
                break
            if t_cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t_cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(model)
            spent = time.perf_counter() - t0
            bar.update(1, loss=f"{loss_sum / max(1, n_seen):.4f}", img_s=f"{n_seen / spent:.0f}",
                       eta=f"{spent / (step + 1) * (steps_per_epoch - step - 1):.0f}s")
            if elapsed + spent > deadline:
                status, reason, stop = "finished", f"time limit of {t_cfg.time_limit_min} min reached in epoch {epoch + 1}", True
                break
        epoch_time = time.perf_counter() - t0
        elapsed += epoch_time
        train_time += epoch_time
        imgs_seen += n_seen
        data_total += data_time
        if status == "failed":
            bar.close(f"epoch {epoch + 1}: {reason}")
            break
        eval_model = ema.module if ema is not None else model
        val = classification_metrics(predict(eval_model, val_feed, augment, t_cfg.eval_batch_size, autocast),
                                     val_ds.labels, num_classes)
        line = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, n_seen), "val_loss": val["loss"],
                "val_acc": val["acc1"], "lr": optimizer.param_groups[0]["lr"], "seconds": epoch_time,
                "img_s": n_seen / max(epoch_time, 1e-9), "elapsed": elapsed,
                "data_share": data_time / max(epoch_time, 1e-9)}  # input pipeline's share of the epoch
        rundir.append_jsonl(out_dir / "metrics.jsonl", line)
        improved = val["acc1"] > best_acc
        if improved:
            best_acc, best_epoch = val["acc1"], epoch + 1
            patience_left = t_cfg.early_stop_patience
            checkpoint("best", epoch + 1)
        elif patience_left is not None:
            patience_left -= 1
        checkpoint("last", epoch + 1)
        bar.close(f"epoch {epoch + 1}/{t_cfg.epochs}  train_loss {line['train_loss']:.4f}  val_loss {val['loss']:.4f}  "
                  f"val_acc {val['acc1']:.4f}{' *' if improved else ''}  {line['img_s']:.0f} img/s  {epoch_time:.1f}s  "
                  f"data {line['data_share']:.1%}")
        if stop:
            break
        if patience_left is not None and patience_left <= 0:
            reason = f"early stop: no val_acc improvement for {t_cfg.early_stop_patience} epochs"
            break

    if best_epoch < 0:  # diverged before any epoch finished: nothing to evaluate
        rundir.set_status(out_dir, "failed", reason)
        raise RuntimeError(f"run {out_dir} {reason}; no checkpoint was kept")
    final = evaluate_run(out_dir, cfg, model, augment, test_feed, test_ds.labels, num_classes, device, autocast, mcfg)
    final.update(epochs=best_epoch if status == "failed" else epoch + 1, best_epoch=best_epoch, seconds=elapsed,
                 train_images_per_s=imgs_seen / train_time if train_time else None,
                 data_share=data_total / train_time if train_time else None, status=status, reason=reason)
    rundir.write_json(out_dir / "final.json", final)
    rundir.set_status(out_dir, status, reason)
    if status == "failed":
        raise RuntimeError(f"run {out_dir} {reason}; the last good checkpoint is kept and evaluated in final.json")
    return final


def evaluate_run(out_dir, cfg, model, augment, test_feed, test_labels, num_classes, device, autocast, mcfg) -> dict:
    """Test metrics of the best checkpoint, plus cost figures."""
    from torch.utils.flop_counter import FlopCounterMode

    state = rundir.load_checkpoint(Path(out_dir) / "checkpoints" / "best.pt")
    model.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
    bs = cfg.train.eval_batch_size
    logits = predict(model, test_feed, augment, bs, autocast)
    metrics = classification_metrics(logits, test_labels, num_classes)
    x = augment.normalize(test_feed.sample(bs))
    model.eval()
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(x[:1])
        times = []
        for _ in range(5):
            t = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    metrics.update(params=sum(p.numel() for p in model.parameters()), flops=counter.get_total_flops(),
                   infer_ms_per_batch=sorted(times)[len(times) // 2] * 1e3, infer_batch=x.shape[0],
                   test_size=len(test_feed), model=mcfg)
    return metrics
