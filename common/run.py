"""Run bookkeeping: seeding, crash-safe file writes, checkpoints, the run directory, and the CLI entry wrapper.

A run directory holds everything one invocation produced and is never reused:

    <out>/<name>_<YYYYmmdd-HHMMSS>[_N]/
        checkpoint/     model / training-state files (atomic writes)
        code/           copy of the experiment's .py/.yaml/.yml/.sh files, as they were when the run started
        log/            console.log (everything logged), config.yaml (the resolved config)
        events.out.tfevents.*, summary.json, *.csv
"""
from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import logging
import os
import pickle
import random
import shutil
import sys
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from common.config import ConfigError, DataError, UserError, atomic_write, save_yaml
from common.ddp import unwrap


def derived_seed(seed: int, *names) -> int:
    """A seed for one named part of a run (e.g. a (loss, mask) configuration), stable across processes and Python
    versions (crc32, not hash()) and independent of which other parts run, so a configuration's random draws — and
    hence its numbers — do not depend on what ran before it."""
    return (int(seed) * 1_000_003 + zlib.crc32("/".join(map(str, names)).encode())) % 2 ** 63


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and every GPU). deterministic=True also asks torch for deterministic
    kernels (warning, not failing, where none exists) at some speed cost. Any non-negative int is accepted (e.g. a
    `derived_seed`, up to 2**63): numpy's legacy seeding takes it modulo 2**32."""
    # PYTHONHASHSEED only affects interpreters started after this point (e.g. DataLoader workers under spawn).
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes (common.config.atomic_write): a crash mid-write leaves the previous file intact.

def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save(obj, path), atomically."""
    return atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), "w")


def to_python(x: Any) -> Any:
    """numpy / torch scalars and arrays, Paths -> plain Python values, for JSON and CSV."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.item() if x.numel() == 1 and x.dim() == 0 else x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


def _json_default(x: Any) -> Any:
    out = to_python(x)
    if out is x:
        raise TypeError(f"object of type {type(x).__name__} is not JSON serializable")
    return out


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """JSON with indent 2; numpy / torch values become plain numbers and lists."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

def _one_line(e: BaseException, limit: int = 200) -> str:
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """torch.load with one-line DataErrors for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        try:
            # Plain tensors / dicts / numbers load with the safe unpickler; only fall back to full unpickling
            # (arbitrary objects, e.g. a saved numpy RNG state) for the files we wrote ourselves.
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable checkpoint ({_one_line(e)})") from None


def save_training_state(path: str | os.PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                        epoch: int, **extra) -> Path:
    """Atomically save what a resume needs: model / optimizer / scheduler state, the epoch, and any `extra` values
    (best score, RNG state, ...). DDP and compile wrappers are stripped, so the file loads into a bare model."""
    state = {"model": unwrap(model).state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "epoch": epoch, **extra}
    return atomic_save(state, path)


def load_training_state(path: str | os.PathLike, *, model: torch.nn.Module, optimizer=None, scheduler=None,
                        map_location: Any = "cpu") -> dict:
    """Restore the states `save_training_state` wrote into the given objects; returns the whole dict
    ('epoch' = the last finished epoch, plus the extras)."""
    ckpt = load_checkpoint(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
        raise DataError(f"{path}: not a training-state checkpoint (expected keys 'model' and 'epoch')")
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise DataError(f"{path}: checkpoint does not match the model ({_one_line(e)})") from None
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None:
            continue
        if ckpt.get(name) is None:
            raise DataError(f"{path}: checkpoint has no {name} state to resume from")
        try:
            obj.load_state_dict(ckpt[name])
        except (ValueError, KeyError, RuntimeError) as e:
            raise DataError(f"{path}: {name} state does not match ({_one_line(e)})") from None
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# Run directory

CODE_SUFFIXES = (".py", ".yaml", ".yml", ".sh")
CODE_SKIP_DIRS = {"runs", "__pycache__", ".venv", "experiments"}


class _NullWriter:
    """Stands in for SummaryWriter on non-main ranks and when tensorboard is not installed."""

    def add_scalar(self, *args, **kwargs): pass
    def add_scalars(self, *args, **kwargs): pass
    def add_image(self, *args, **kwargs): pass
    def add_figure(self, *args, **kwargs): pass
    def add_histogram(self, *args, **kwargs): pass
    def add_text(self, *args, **kwargs): pass
    def flush(self): pass
    def close(self): pass


def copy_code(src: str | os.PathLike, dst: str | os.PathLike, skip: Iterable[str | os.PathLike] = ()) -> int:
    """Copy the code files under `src` into `dst`, keeping relative paths; returns how many were copied.

    Skips CODE_SKIP_DIRS, hidden directories (.git, caches) and the directories in `skip` (run outputs)."""
    src, dst = Path(src).resolve(), Path(dst)
    skip = {Path(p).resolve() for p in skip}
    n = 0
    for root, dirs, files in os.walk(src):
        root = Path(root)
        dirs[:] = sorted(d for d in dirs if d not in CODE_SKIP_DIRS and not d.startswith(".") and root / d not in skip)
        for name in sorted(files):
            if name.endswith(CODE_SUFFIXES):
                target = dst / (root / name).relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, target)
                n += 1
    return n


class RunDir:
    """One run's output directory. Make it with `RunDir.create` (new) or `RunDir.open` (resume).

    enabled=False (DDP ranks other than 0): every method is a no-op and nothing is created on disk; `path` is
    where rank 0 would write when no suffix was needed.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.checkpoint_dir = self.path / "checkpoint"
        self.code_dir = self.path / "code"
        self.log_dir = self.path / "log"
        self._writer = None
        self._handlers: list[logging.Handler] = []
        self._lock_fd: int | None = None
        if not enabled:
            self.logger = logging.Logger(f"run.{self.path.name}")  # unregistered, and silenced
            self.logger.disabled = True
            self._writer = _NullWriter()
            return
        self.logger = logging.getLogger(f"run.{self.path.name}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # our handlers print it; don't print twice through the root logger
        for d in (self.checkpoint_dir, self.code_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for h in (logging.StreamHandler(sys.stdout), logging.FileHandler(self.log_dir / "console.log")):
            h.setFormatter(fmt)
            self.logger.addHandler(h)
            self._handlers.append(h)

    @classmethod
    def create(cls, out_root: str | os.PathLike, name: str, *, config: dict | None = None,
               code_from: str | os.PathLike | None = None, timestamp: str | None = None,
               enabled: bool = True) -> "RunDir":
        """A new `<out_root>/<name>_<timestamp>` directory (`_1`, `_2`, ... appended if that exists), with the code
        under `code_from` copied to code/ and `config` saved to log/config.yaml."""
        timestamp = timestamp or datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(out_root) / f"{name}_{timestamp}"
        if not enabled:
            return cls(base, enabled=False)
        path, i = base, 0
        try:
            base.parent.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    path.mkdir()  # atomic: of two runs started in the same second, exactly one gets each name
                    break
                except FileExistsError:
                    i += 1
                    path = base.with_name(f"{base.name}_{i}")
        except OSError as e:  # (a name already taken is handled above: this is --out itself)
            raise ConfigError(f"--out {out_root}: cannot create the run directory there ({e.strerror or e})") \
                from None
        run = cls(path)
        if code_from is not None:
            # Outputs may live under the code folder (--out results): copy neither them nor earlier runs.
            copy_code(code_from, run.code_dir, skip=[run.path, run.path.parent])
        if config is not None:
            save_yaml(config, run.log_dir / "config.yaml")
        return run

    @classmethod
    def open(cls, path: str | os.PathLike, *, enabled: bool = True) -> "RunDir":
        """An existing run directory, to resume into; the log is appended to."""
        if enabled and not Path(path).is_dir():
            raise DataError(f"{path}: run directory not found")
        return cls(path, enabled=enabled)

    @property
    def writer(self):
        """TensorBoard SummaryWriter writing into `path`, created on first use."""
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(log_dir=str(self.path))
            except ImportError:
                self._writer = _NullWriter()
        return self._writer

    def log(self, msg: str) -> None:
        if self.enabled:
            self.logger.info(msg)

    def scalar(self, tag: str, value: Any, step: int) -> None:
        if self.enabled:
            self.writer.add_scalar(tag, float(value), step)

    def file(self, name: str) -> Path:
        return self.path / name

    def save_checkpoint(self, state: Any, name: str = "checkpoint.pth") -> Path:
        path = self.checkpoint_dir / name
        if self.enabled:
            atomic_save(state, path)
        return path

    def write_summary(self, d: dict) -> Path:
        path = self.file("summary.json")
        if self.enabled:
            atomic_write_json(path, d)
        return path

    def write_csv(self, name: str, rows: list[dict], columns: list[str] | None = None) -> Path:
        """rows as CSV; columns default to every key, in order of first appearance. Missing cells are empty."""
        path = self.file(name)
        if not self.enabled:
            return path
        if columns is None:
            columns = list(dict.fromkeys(k for row in rows for k in row))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: to_python(v) for k, v in row.items()})
        atomic_write_text(path, buf.getvalue())
        return path

    def lock(self) -> "RunDir":
        """Hold an exclusive lock on this run directory until close() or the process ends (the kernel drops it
        even on kill -9). A second process resuming the same run gets a one-line error instead of writing beside
        the first."""
        if not self.enabled or self._lock_fd is not None:
            return self
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise DataError(f"{self.path}: run directory is in use by another process; wait for it to end") \
                    from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        return self

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._writer is not None:
            self._writer.close()
        for h in self._handlers:
            self.logger.removeHandler(h)
            h.close()
        self._handlers = []

    def discard(self) -> None:
        """Close and delete this run directory: for a run that failed on bad input before producing anything, so
        that no empty run is left to be mistaken for a result. Refuses once a checkpoint or summary exists."""
        self.close()
        if not self.enabled or not self.path.exists():
            return
        if (self.path / "summary.json").exists() or any(self.checkpoint_dir.glob("*")):
            raise RuntimeError(f"{self.path}: holds results; not discarding it")
        shutil.rmtree(self.path)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}{'' if self.enabled else ', enabled=False'})"


# ----------------------------------------------------------------------------------------------------------------
# Generated data

GENERATED_MARKER = ".cmkd-generated"


def generator_dir(path: str | os.PathLike, what: str = "demo data") -> Path:
    """The directory a data generator (a --demo, a synthetic dataset) may write into: `path` if it is new or empty
    (it is then created and marked as generated), or if an earlier generator run marked it. A directory holding
    anything else is refused with a one-line DataError, so a generator never rewrites a real dataset."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(f"refusing to write {what} into {path}: it is a file, not a directory")
    if path.is_dir() and not (path / GENERATED_MARKER).is_file() and any(path.iterdir()):
        raise DataError(f"refusing to write {what} into {path}: it holds files this generator did not create "
                        f"(choose a new or empty directory)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / GENERATED_MARKER).write_text(f"written by a generator of this project: {what}\n")
    except OSError as e:
        raise DataError(f"{path}: cannot write {what} there ({e.strerror or e})") from None
    return path


# ----------------------------------------------------------------------------------------------------------------
# Entry point

def worker_error(e: UserError) -> UserError:
    """A UserError raised in a DataLoader worker reaches the main process re-raised by torch as "Caught DataError in
    DataLoader worker process 0. Original Traceback ..."; give back the worker's own one line."""
    text = str(e)
    if not text.startswith("Caught "):
        return e
    lines = [line for line in text.splitlines() if line.strip()]
    head, sep, message = lines[-1].partition(": ")
    return type(e)(message if sep and head.endswith(type(e).__name__) else lines[-1])


def cli(main_fn: Callable[[], Any]) -> Any:
    """Run an experiment's main(): a UserError becomes `error: <message>` on stderr and exit code 2, Ctrl-C exit 130.

        if __name__ == "__main__":
            cli(main)
    """
    try:
        return main_fn()
    except UserError as e:  # (one from a DataLoader worker: its own line, not torch's flattened traceback)
        print(f"error: {_one_line(worker_error(e), limit=1000)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
