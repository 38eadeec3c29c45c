"""The run directory: the only interface between training and reporting.

    config.yaml  env.json  split.json  metrics.jsonl  final.json  status.json  checkpoints/{best,last}.pt

Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: Path, obj: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temporary file, then rename (a crash never leaves a truncated checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path) -> dict:
    """Load with ``weights_only=True``: a checkpoint that would execute code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as err:  # weights_only refused a global: loading it would run code
        first = ' '.join(str(err).split())
        if "Weights only load failed" in first or "global" in first.lower():
            raise ValueError(f"refusing to load {path}: it holds objects other than tensors and plain data "
                             f"(unpickling it could execute code); only vitlab checkpoints are loaded") from None
        raise ValueError(f"cannot load checkpoint {path}: it is corrupt ({first[:200]})") from None
    except Exception as err:  # truncated or corrupt zip archive
        raise ValueError(f"cannot load checkpoint {path}: truncated or corrupt "
                         f"({' '.join(str(err).split())[:200]})") from None


def set_status(run_dir: Path, status: str, reason: str = "") -> None:
    write_json(run_dir / "status.json", {"status": status, "reason": reason, "time": time.time()})


def environment(device: torch.device) -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
           "device": str(device), "threads": torch.get_num_threads(), "argv": sys.argv}
    for mod in ("torchvision", "timm", "numpy"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    from . import __version__
    env["vitlab"] = __version__
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        root = Path(__file__).resolve().parents[2]
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                           timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env
