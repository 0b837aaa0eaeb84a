"""The small mechanics every experiment's trainer calls. Not a loop: each experiment keeps its own `trainer.py`.

    teacher = freeze(teacher)                                   # eval mode, no gradient, stays in eval
    gen = loader_generator(cfg["seed"], "student")              # same batches, same order for baseline and KD
    loader = DataLoader(train_set, shuffle=True, generator=gen, worker_init_fn=seed_worker)
    ckpt = Checkpoint(rd.checkpoint_dir / "train_state.pth", model=student, optimizer=opt, generator=gen,
                      selector=selector, log=log)
    start = ckpt.load(device)["epoch"] if resuming else 0
    for epoch in range(start + 1, epochs + 1):
        for step, batch in enumerate(loader, 1):
            loss, parts = objective(student(x), teacher(x_t), y)
            check_finite(loss, parts, epoch=epoch, step=step)   # one-line error, last checkpoint intact
            ...
            log.add(parts); log.add_omega(objective.last_omega)
        record = log.end_epoch(epoch, val_acc=val_acc)          # TensorBoard + <tag>_log.csv, DDP-reduced
        selector.update(val_acc, epoch, student)                # selection on the held-out validation split
        if due(epoch, cfg["checkpoint_every"]): ckpt.save(epoch=epoch)
    selector.restore(student); test = evaluate(student, test_loader)   # the test split, once
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from common import ddp
from common.config import ConfigError, DataError, UserError
from common.run import atomic_save, derived_seed, load_checkpoint

# ----------------------------------------------------------------------------------------------------------------
# Teacher


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a teacher: eval mode (BatchNorm statistics, dropout off), no gradients, and `.train()` — called on it or
    on a module holding it — keeps it in eval mode (a frozen teacher in train mode silently changes its outputs)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        m.train = _stay_in_eval.__get__(m)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Data order and randomness


def loader_generator(seed: int, *names) -> torch.Generator:
    """A fresh generator for one fit's DataLoader, seeded from (seed, names). Two fits with the same names draw the
    same shuffles (a no-KD baseline and a KD student compared on equal footing), whatever ran before them."""
    g = torch.Generator()
    g.manual_seed(derived_seed(seed, "loader", *names))
    return g


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed numpy and python's random from the worker's torch seed (which the loader
    derives from its generator), so augmentations differ between workers and are reproducible."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


class SharedEpoch:
    """The current epoch, readable inside DataLoader workers (persistent ones included).

    Workers hold a copy of the dataset made when they started, so an attribute set on the dataset later never reaches
    them; a tensor in shared memory does. Set it in the main process before iterating the loader each epoch."""

    def __init__(self, epoch: int = 0):
        self._t = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._t[0] = epoch

    def set(self, epoch: int) -> None:
        self._t[0] = int(epoch)

    def get(self) -> int:
        return int(self._t[0])


def epoch_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one sample's augmentation in one epoch: differs between epochs and samples, does not
    depend on which worker loads the sample, and is the same on a rerun."""
    return np.random.default_rng([int(seed) % 2 ** 63, int(epoch), int(index)])


def holdout_split(n: int, fraction: float, seed: int, labels: Iterable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): a seeded carve-out of round(fraction · n) samples for model selection, for datasets
    without a validation split. With labels, each class gives its share (at least one sample per class that has two).
    Both index arrays are sorted."""
    if not (0 < float(fraction) < 1):
        raise ConfigError(f"validation fraction must be in (0, 1), got {fraction!r}")
    if n < 2:
        raise DataError(f"cannot hold out a validation split from {n} sample(s)")
    rng = np.random.default_rng(derived_seed(seed, "holdout"))
    if labels is None:
        k = min(max(1, round(fraction * n)), n - 1)
        val = rng.permutation(n)[:k]
    else:
        labels = np.asarray(list(labels))
        if len(labels) != n:
            raise ValueError(f"holdout_split: {len(labels)} labels for {n} samples")
        val_parts = []
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            k = min(max(1 if len(idx) > 1 else 0, round(fraction * len(idx))), len(idx) - 1)
            val_parts.append(rng.permutation(idx)[:k])
        val = np.concatenate(val_parts)
        if len(val) == 0:
            raise DataError(f"cannot hold out a stratified validation split: no class has two samples (n={n})")
    mask = np.zeros(n, dtype=bool)
    mask[val] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


# ----------------------------------------------------------------------------------------------------------------
# Non-finite guard


class NonFiniteLoss(UserError):
    """A loss became NaN or inf: the run stops (one line, exit 2); the last checkpoint written stays intact."""


def _value(v: Any) -> float:
    return float(v.detach().float().sum()) if torch.is_tensor(v) else float(v)


def check_finite(total: Any, parts: dict | None = None, *, epoch: int, step: int, where: str = "") -> None:
    """Raise NonFiniteLoss naming the epoch, the step and the first non-finite term (or the total).

    One host sync per call; trainers that log the terms every step pay it anyway."""
    if math.isfinite(_value(total)):
        return
    bad = [(k, _value(v)) for k, v in (parts or {}).items() if not math.isfinite(_value(v))]
    name, value = bad[0] if bad else ("total", _value(total))
    prefix = f"{where}: " if where else ""
    raise NonFiniteLoss(f"{prefix}non-finite loss at epoch {epoch}, step {step}: term '{name}' = {value} "
                        f"(stopped; the last checkpoint written before it is intact — lower the learning rate, "
                        f"check the inputs or the loss settings)")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint + resume


def due(i: int, every: int) -> bool:
    """True on every `every`-th epoch or step (never when every <= 0)."""
    return every > 0 and i % every == 0


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class Checkpoint:
    """A run's training state in one file, written atomically (a crash mid-write keeps the previous one).

    `objects` are saved by name: anything with state_dict / load_state_dict (models — DDP / compile wrappers are
    stripped —, optimisers, schedulers, AMP scalers, a kd Objective's parameters, Selector, EpochLog) and
    torch.Generators (the loader's shuffle state). The RNG states of python, numpy, torch and CUDA go with them, so a
    resumed run draws what the uninterrupted run would have drawn from the checkpoint on."""

    def __init__(self, path: str | os.PathLike, **objects):
        self.path = Path(path)
        self.objects = {k: v for k, v in objects.items() if v is not None}

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, *, epoch: int, step: int = 0, **extra) -> Path:
        """Write the state after `epoch` (and global `step`); rank 0 only, the others wait for it."""
        if ddp.is_main():
            state = {"epoch": int(epoch), "step": int(step), "rng": _rng_state(), "extra": extra, "objects": {}}
            for name, obj in self.objects.items():
                if isinstance(obj, torch.Generator):
                    state["objects"][name] = obj.get_state()
                else:
                    state["objects"][name] = ddp.unwrap(obj).state_dict() if isinstance(obj, nn.Module) \
                        else obj.state_dict()
            atomic_save(state, self.path)
        ddp.barrier()
        return self.path

    def load(self, map_location: Any = "cpu") -> dict:
        """Restore every object and the RNG states; returns {"epoch", "step", **extra}."""
        state = load_checkpoint(self.path, map_location)
        if not isinstance(state, dict) or "objects" not in state or "epoch" not in state:
            raise DataError(f"{self.path}: not a training-state checkpoint of this project (no 'objects'/'epoch')")
        missing = sorted(set(self.objects) - set(state["objects"]))
        if missing:
            raise DataError(f"{self.path}: checkpoint lacks the state of {', '.join(missing)}")
        for name, obj in self.objects.items():
            saved = state["objects"][name]
            try:
                if isinstance(obj, torch.Generator):
                    obj.set_state(saved.cpu())
                elif isinstance(obj, nn.Module):
                    ddp.unwrap(obj).load_state_dict(saved)
                else:
                    obj.load_state_dict(saved)
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())[:200]
                raise DataError(f"{self.path}: saved {name} does not match ({reason})") from None
        _set_rng_state(state["rng"])
        return {"epoch": state["epoch"], "step": state["step"], **state.get("extra", {})}


# ----------------------------------------------------------------------------------------------------------------
# Model selection


class Selector:
    """Keeps the weights of the best epoch on the validation split; the test split is evaluated once, at the end,
    after `restore`. mode "max" (accuracy, IoU, CCC) or "min" (a loss). A non-finite score never counts as best."""

    def __init__(self, mode: str = "max", path: str | os.PathLike | None = None):
        if mode not in ("max", "min"):
            raise ValueError(f"Selector mode must be 'max' or 'min', got {mode!r}")
        self.mode, self.path = mode, Path(path) if path is not None else None
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None

    def better(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def update(self, score: float, epoch: int, model: nn.Module) -> bool:
        score = float(score)
        if not self.better(score):
            return False
        self.best_score, self.best_epoch = score, int(epoch)
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in ddp.unwrap(model).state_dict().items()}
        if self.path is not None and ddp.is_main():
            atomic_save({"model": self.best_state, "epoch": self.best_epoch, "score": self.best_score}, self.path)
        return True

    def restore(self, model: nn.Module) -> nn.Module:
        """Load the best weights into `model` (unchanged when nothing was selected yet)."""
        if self.best_state is not None:
            ddp.unwrap(model).load_state_dict(self.best_state)
        return model

    def state_dict(self) -> dict:
        return {"mode": self.mode, "best_score": self.best_score, "best_epoch": self.best_epoch,
                "best_state": self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_state = state["best_state"]


# ----------------------------------------------------------------------------------------------------------------
# Per-term logging and ω statistics


class EpochLog:
    """Per-epoch means of the named loss terms and, when a term uses ω, ω statistics (mean ω and the share of
    samples / pixels / voxels with ω < 1), reduced over DDP ranks, written to TensorBoard (`<tag>/<name>`) and to
    `<tag>_log.csv` in the run directory (the whole history, rewritten atomically each epoch)."""

    def __init__(self, run_dir, tag: str):
        self.run_dir, self.tag = run_dir, tag
        self.history: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._count: float = 0.0
        self._omega: torch.Tensor | None = None  # [sum ω, count ω < 1, count]

    def add(self, parts: dict, n: int = 1) -> None:
        """Accumulate one step's terms (tensors stay on their device: no host sync here). `n` weights the step."""
        for k, v in parts.items():
            v = v.detach().float().sum() if torch.is_tensor(v) else torch.tensor(float(v))
            self._sums[k] = self._sums[k] + v * n if k in self._sums else v * n
        self._count += n

    def add_omega(self, omega: torch.Tensor | None) -> None:
        if omega is None:
            return
        w = omega.detach().float()
        stats = torch.stack([w.sum(), (w < 1).sum().float(), torch.tensor(float(w.numel()), device=w.device)])
        self._omega = stats if self._omega is None else self._omega + stats.to(self._omega.device)

    def _reduced(self) -> dict:
        names = sorted(self._sums)
        values = [self._sums[k] for k in names]
        device = values[0].device if values else (self._omega.device if self._omega is not None else "cpu")
        packed = torch.stack([v.to(device) for v in values] + [torch.tensor(self._count, device=device)])
        if self._omega is not None:
            packed = torch.cat([packed, self._omega.to(device)])
        packed = ddp.all_reduce_sum(packed).cpu().double()
        count = max(float(packed[len(names)]), 1e-12)
        out = {f"train_{k}": float(packed[i]) / count for i, k in enumerate(names)}
        if self._omega is not None:
            s, below, total = (float(x) for x in packed[len(names) + 1:])
            out["omega_mean"] = s / max(total, 1.0)
            out["omega_masked_share"] = below / max(total, 1.0)
        return out

    def end_epoch(self, epoch: int, **metrics) -> dict:
        """Close the epoch: reduce, log and return the record {epoch, train_<term>..., omega_*, **metrics}."""
        record = {"epoch": int(epoch), **self._reduced(), **{k: float(v) for k, v in metrics.items()}}
        self._reset()
        self.history.append(record)
        if self.run_dir is not None and getattr(self.run_dir, "enabled", True):
            for k, v in record.items():
                if k != "epoch":
                    self.run_dir.scalar(f"{self.tag}/{k}", v, epoch)
            self.run_dir.write_csv(f"{self.tag}_log.csv", self.history)
        return record

    def omega_summary(self) -> dict:
        """ω statistics for summary.json: per epoch and over the run (empty when no term used ω)."""
        per_epoch = [{"epoch": r["epoch"], "omega_mean": r["omega_mean"], "omega_masked_share": r["omega_masked_share"]}
                     for r in self.history if "omega_mean" in r]
        if not per_epoch:
            return {}
        return {"omega_per_epoch": per_epoch,
                "omega_mean": float(np.mean([r["omega_mean"] for r in per_epoch])),
                "omega_masked_share": float(np.mean([r["omega_masked_share"] for r in per_epoch]))}

    def state_dict(self) -> dict:
        return {"history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = copy.deepcopy(state["history"])


# ----------------------------------------------------------------------------------------------------------------
# --resume


def add_resume_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                        help="continue a run from its last checkpoint: a run directory, or no value for the newest "
                             "run of this experiment under --out")


def resume_dir(arg: str | None, out_root: str | os.PathLike, name: str) -> Path | None:
    """The run directory `--resume` names: None without the flag; "latest" = the newest `<out_root>/<name>_*`; a
    checkpoint file inside a run directory names its run."""
    if not arg:
        return None
    if arg == "latest":
        runs = sorted((p for p in Path(out_root).glob(f"{name}_*") if (p / "log" / "config.yaml").is_file()),
                      key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ConfigError(f"--resume: no run of '{name}' under {out_root} to continue")
        return runs[-1]
    path = Path(arg)
    if path.is_file() and path.parent.name == "checkpoint":
        path = path.parent.parent
    if not (path / "log" / "config.yaml").is_file():
        raise ConfigError(f"--resume: {arg} is not a run directory (expected a folder with log/config.yaml)")
    return path


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def check_resume_config(saved: dict, new: dict, identity_keys: Iterable[str]) -> None:
    """Refuse to resume a run with a config that changes what the run is: any key under one of `identity_keys`
    (dotted prefixes, e.g. "model", "data", "loss") that differs between the saved and the new config."""
    a, b = _flat(saved), _flat(new)
    changed = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in identity_keys) and a.get(key) != b.get(key):
            changed.append(f"{key} ({a.get(key)!r} -> {b.get(key)!r})")
    if changed:
        raise ConfigError(f"--resume: the config changes what the run is: {'; '.join(changed)}; start a new run "
                          f"instead")

