"""The run directory: the only interface between training and reporting.

    config.yaml  env.json  split.json  metrics.jsonl  final.json  status.json  checkpoints/{best,last}.pt

Every file is written to a temporary name and renamed, so a reader never sees half a file.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Tuple

import torch


class OutputError(OSError):
    """Writing the run (or comparison) directory failed: disk full, read-only, no permission, a file
    where a folder should be. Its message is one line naming the path and the reason."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)  # one argument: str() is the message, without an "[Errno N]" prefix
        self.errno = code


# why a write failed, by errno, said of the directory written into
_WRITE_FAILURES = {errno.ENOSPC: "is full (no space left on the device)",
                   errno.EDQUOT: "is full (disk quota exceeded)",
                   errno.EROFS: "is read-only (read-only file system)",
                   errno.EACCES: "is not writable (permission denied)",
                   errno.EPERM: "is not writable (operation not permitted)"}


def output_error(path: Path, err: BaseException) -> OutputError:
    """``err`` (raised while writing ``path``) as a one-line :class:`OutputError`. torch.save wraps
    the OSError of a failed write in a RuntimeError: the OSError is found in the exception's context."""
    path = Path(path)
    cause, seen = err, set()
    while cause is not None and not isinstance(cause, OSError) and id(cause) not in seen:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    code = cause.errno if isinstance(cause, OSError) else None
    if code in _WRITE_FAILURES:
        return OutputError(f"cannot write {path}: the output directory {path.parent} {_WRITE_FAILURES[code]}", code)
    detail = getattr(cause, "strerror", None) or " ".join(str(err).split())[:200]
    return OutputError(f"cannot write {path}: {detail}", code)


class Terminated(BaseException):
    """SIGTERM outside the training loop (which checkpoints at its next step instead): raised in the
    main thread as SIGINT raises KeyboardInterrupt, so a command stops through its cleanup (a run's
    status, a comparison's child runs) instead of dying where it stands with ``running`` on disk."""

    signum = 15


@contextlib.contextmanager
def sigterm_raises():
    """For the ``with`` block, SIGTERM raises :class:`Terminated` in the main thread."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def exclusive(path: Path, what: str, advice: str):
    """Hold ``PATH/.lock`` (an exclusive ``flock``, released when the process ends, however it ends)
    for the ``with`` block: a second process that would write the same directory (two trainers on
    one run, two comparisons into one folder) gets a one-line ValueError saying who holds it:
    "another ``what`` (pid N on HOST) is running in PATH; ``advice``"."""
    import fcntl

    make_dir(path)
    with open(Path(path) / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            who = f.read().strip() or "another process"
            raise ValueError(f"another {what} ({who}) is running in {path}; {advice}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            f.truncate(0)


def make_dir(path: Path) -> None:
    """``mkdir -p path``, with one-line errors for a file in the way or an unwritable parent."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot use {path} as an output directory: it is a file", errno.EEXIST) from None
    except NotADirectoryError:
        parent = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise OutputError(f"cannot create output directory {path}: {parent} is a file, not a directory",
                          errno.ENOTDIR) from None
    except OSError as err:
        raise output_error(path, err) from err


def check_output_dir(path: Path) -> None:
    """Fail early, before any data is read, when ``path`` cannot become an output directory: it is a
    file, or the nearest existing folder on its way is a file or not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot use {path} as an output directory: it is a file", errno.EEXIST)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(f"cannot create output directory {path}: {existing} is a file, not a directory",
                          errno.ENOTDIR)
    if existing is not None:
        try:  # a real (anonymous, self-deleting) file: os.access cannot tell read-only from full or denied
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as err:
            why = _WRITE_FAILURES.get(err.errno) or f"is not writable ({err.strerror or err})"
            raise OutputError(f"cannot write into {path}: the output directory {existing} {why}", err.errno) from err


_UMASK = os.umask(0o022)  # read it (the only way), then put it back
os.umask(_UMASK)


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], failures=(OSError,)) -> None:
    """``write(f)`` into a temporary file in the same folder, fsync, rename: a reader never sees half a
    file, and nothing is left behind on failure. Our own file object, closed (its blocks freed once
    unlinked) even when ``write`` fails; ``failures`` become one-line :class:`OutputError`s."""
    path = Path(path)
    make_dir(path.parent)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from the rest of a lab's group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # the rename itself survives a power loss too
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, failures) and not isinstance(err, OutputError):
            raise output_error(path, err) from err
        raise


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries to disk (POSIX; a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def append_jsonl(path: Path, obj: Any) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # a torn last line is dropped by its readers
        raise output_error(Path(path), err) from err


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save, atomically (a crash never leaves a truncated checkpoint). A full disk surfaces as
    torch's RuntimeError with the OSError in its context: both become one-line errors."""
    _atomic_write(path, lambda f: torch.save(state, f), failures=(OSError, RuntimeError))


def load_checkpoint(path: Path, need: Tuple[str, ...] = ("model",)) -> dict:
    """Load with ``weights_only=True``: a checkpoint that would execute code is refused; so is one
    without the entries ``need`` (another program's file, or a bare tensor)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except pickle.UnpicklingError as err:  # weights_only refused a global: loading it would run code
        first = _first_sentence(err)
        if "Weights only load failed" in first or "global" in first.lower():
            raise ValueError(f"refusing to load {path}: it holds objects other than tensors and plain data "
                             f"(unpickling it could execute code); only vitlab checkpoints are loaded") from None
        raise ValueError(f"cannot load checkpoint {path}: it is corrupt ({first})") from None
    except Exception as err:  # truncated or corrupt zip archive
        raise ValueError(f"cannot load checkpoint {path}: truncated or corrupt ({_first_sentence(err)})") from None
    missing = [k for k in need if k not in state] if isinstance(state, dict) else list(need)
    if missing:
        raise ValueError(f"{path} is not a vitlab checkpoint (no {', '.join(repr(k) for k in missing)} in it)")
    return state


def _first_sentence(err: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, to its first sentence (torch's loading errors go on for
    several), never cut mid-word without saying so."""
    text = " ".join(str(err).split())
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


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
    env["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")  # set per run by a launcher
    try:
        root = Path(__file__).resolve().parents[2]
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                           timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env
