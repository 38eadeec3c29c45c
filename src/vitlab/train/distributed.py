"""Data parallelism under torchrun: one run across processes with DistributedDataParallel.

``torchrun --nproc_per_node N -m vitlab train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous address); ``vitlab train`` then joins the process group (NCCL on CUDA, gloo on CPU).

How the work is split so that N processes train the run one process would, with the same recipe:
- every rank draws the same data order (one generator, same seed) and the same global batch of
  ``train.batch_size`` items, and keeps its own contiguous slice: rank r takes items
  [r*B/N, (r+1)*B/N). It augments only its slice (a streamed folder decodes only its slice too),
  with a random stream of its own, as dropout has, so without random augmentation or dropout N
  processes agree with one up to float summation order (tested), and with them the run is an
  equally valid draw, not the same one (MixUp/CutMix pair images within a rank's slice);
- DDP averages gradients over ranks, which equals the gradient of the global-batch mean loss
  because the slices are equal in size (the batch size must divide by the world size);
- validation and test predictions are computed on slices and gathered, so metrics are those of
  the whole set; only rank 0 writes files (run directory, checkpoints, final.json).

Every rank reads what rank 0 writes (the best checkpoint for the test metrics, the last one on
resume), so on several nodes the run directory must be on a file system they all share; that is
checked when the run starts (``require_shared``), not found out at the end of training.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def slice(self, n: int) -> slice:
        """This rank's contiguous share of a batch of ``n`` items (n divisible by the world size)."""
        per = n // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def from_env() -> DistInfo:
    """The torchrun environment, or a single process when it is absent."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(rank=int(os.environ["RANK"]), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group (no-op for a single process or when already joined)."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(minutes=30))


def sync_batchnorm(info: DistInfo, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Batch-norm layers (the ResNet baselines) normalise over the global batch, as in one process:
    SyncBatchNorm, which torch implements on GPUs only. On CPU each rank normalises over its own
    slice (what timm's trainer does without --sync-bn), so such a run no longer equals one process's;
    it says so. Parameters and state-dict keys are unchanged (checkpoints load either way)."""
    norms = (torch.nn.modules.batchnorm._BatchNorm,)
    if not info.enabled or not any(isinstance(m, norms) for m in model.modules()):
        return model
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm  # torch's own would drop timm's BatchNormAct activations

        return convert_sync_batchnorm(model)
    if info.is_main:
        warnings.warn(f"batch norm over {info.world} CPU processes: each normalises over its own slice of the "
                      f"batch (SyncBatchNorm needs CUDA), so this run does not equal one process's")
    return model


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_norm_stats(info: DistInfo, model: torch.nn.Module) -> None:
    """Give every rank rank 0's batch-norm running statistics before evaluating. On CPU, where there
    is no SyncBatchNorm, each rank's statistics follow its own slices, so each rank's share of the
    val/test set was normalised with other statistics than the checkpoint rank 0 saves."""
    if not info.enabled:
        return
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            for b in m.buffers():
                dist.broadcast(b, src=0)


def all_sum(info: DistInfo, *values: float) -> list:
    """Sum scalars over ranks (float64 on the CPU, which gloo and NCCL-through-CPU both accept)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_max(info: DistInfo, *values: float) -> list:
    """Element-wise maximum of scalars over ranks (used for the loop's stop flags)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def gather_objects(info: DistInfo, obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def gather_rows(info: DistInfo, x: torch.Tensor, counts: list) -> torch.Tensor:
    """Concatenate per-rank row blocks in rank order; ``counts[r]`` is rank r's number of rows."""
    if not info.enabled:
        return x
    width = max(counts)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    pad = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=dev)
    pad[: x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(pad) for _ in range(info.world)]
    dist.all_gather(parts, pad)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


#: the file rank 0 writes into a run directory for :func:`require_shared`, removed once checked
SHARED_MARKER = ".shared-check"


def require_shared(info: DistInfo, run_dir: Path, wait_s: float = 60.0) -> None:
    """Raise on every rank, at once, unless every rank reads in ``run_dir`` the file rank 0 has just
    written there (call it on every rank, once rank 0 has made the directory).

    The file holds a token drawn for this call, so a rank on a node with a local directory of the
    same name, left by an earlier run, fails the check as one that sees nothing does. A rank polls
    for up to ``wait_s`` seconds: an NFS client may hold a cached "no such file" (or old contents)
    for that long. Listing the directory and its parent makes the client look again rather than
    answer from that cache."""
    if not info.enabled:
        return
    marker = Path(run_dir) / SHARED_MARKER
    token = gather_objects(info, uuid.uuid4().hex)[0]  # rank 0's
    if info.rank == 0:
        marker.write_text(token)
    barrier(info)  # rank 0 has written the marker
    deadline = time.monotonic() + wait_s
    while True:
        try:
            seen = "missing"
            if marker.name in os.listdir(marker.parent):
                seen = "same" if marker.read_text() == token else "other"
        except OSError:
            pass
        if seen == "same" or time.monotonic() >= deadline:
            break
        try:
            os.listdir(marker.parent.parent)
        except OSError:
            pass
        time.sleep(1.0)
    views = gather_objects(info, (socket.gethostname(), str(marker), seen))  # every rank has read it
    if info.rank == 0:
        marker.unlink(missing_ok=True)
    said = {"missing": "does not see", "other": "reads another file at"}
    blind = [f"rank {r} on {host} {said[v]} {path}" for r, (host, path, v) in enumerate(views) if v != "same"]
    if blind:
        raise RuntimeError(f"{'; '.join(blind)} (rank 0 on {views[0][0]} wrote {views[0][1]}): the run "
                           f"directory must be on a file system every node shares")
