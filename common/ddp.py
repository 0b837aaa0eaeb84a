"""torchrun helpers: one code path for single-process and multi-process (DistributedDataParallel) runs.

Launch with `torchrun --nproc_per_node=N main.py ...`; torchrun sets RANK / WORLD_SIZE / LOCAL_RANK. Without it every
helper here degrades to the single-process behaviour (identity reductions, no sampler, unwrapped model), so
experiments call them unconditionally.

    env = init_distributed(device)               # device = device_for(dist_env(), args.device)
    model = wrap_model(model.to(device), device)
    sampler = make_sampler(train_set, shuffle=True)
    ...
    destroy()
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from common.config import resolve_device


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """The process's place in the job, from torchrun's environment variables (0 / 1 / 0 without torchrun)."""
    return DistEnv(rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: torch.device | str | None = None) -> DistEnv:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1 (nccl for CUDA, gloo for CPU)."""
    env = dist_env()
    if env.distributed and not _initialized():
        if device is None or str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(env.local_rank)  # before init, so NCCL binds each rank to its own GPU
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    return env


def device_for(env: DistEnv, want: str) -> torch.device:
    """The device this rank computes on: `want` as in `resolve_device`, with CUDA pinned to cuda:<local_rank>."""
    dev = resolve_device(want)
    if dev.type != "cuda":
        return dev
    if env.distributed or dev.index is None:
        return torch.device(f"cuda:{env.local_rank}")
    return dev


def destroy() -> None:
    if _initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if _initialized() else dist_env().rank


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Collectives: all return new values and are identities in a single process.
# NCCL accepts only tensors on this rank's GPU, gloo only CPU tensors: every reduction here moves its input to the
# process group's device and the result back, so a trainer may reduce whatever it accumulated, wherever it lives.

def collective_device() -> torch.device:
    """The device the process group's collectives need: this rank's GPU for nccl, the CPU otherwise."""
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_collective_device(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of `t` on the process group's device, ready for a collective."""
    return t.detach().to(collective_device(), copy=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not (_initialized() and world_size() > 1):
        return t.detach().clone()
    out = to_collective_device(t)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks / world size (true division, so integer tensors come back as float)."""
    return all_reduce_sum(t) / world_size()


@contextlib.contextmanager
def device_rule_check(backend: str = "nccl"):
    """For tests on machines without a GPU: make torch.distributed's tensor collectives enforce `backend`'s device
    rule while the real collective runs over gloo underneath.

    gloo: every tensor must be on the CPU. nccl: every tensor must be on the group's GPU; with no GPU here, "on the
    group's device" means "moved there by `to_collective_device`" (which, inside this context, marks the CPU copy it
    makes), so a caller that hands a collective a tensor it did not move — the CPU loss sums NCCL rejects — fails as
    it would on GPUs."""
    names = ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor")
    originals = {n: getattr(dist, n) for n in names if hasattr(dist, n)}
    mover = globals()["to_collective_device"]

    def ok(x: torch.Tensor) -> bool:
        if backend == "nccl":
            return x.device.type == "cuda" or getattr(x, "_cmkd_group_device", False)
        return x.device.type == "cpu"

    def guarded(name, fn):
        def call(tensor, *args, **kwargs):
            for x in [*(tensor if isinstance(tensor, (list, tuple)) else [tensor]), *args]:
                if torch.is_tensor(x) and not ok(x):
                    raise RuntimeError(f"{backend}: {name} got a tensor on {x.device} that was not moved to the "
                                       f"process group's device ({backend} rejects it)")
            return fn(tensor, *args, **kwargs)
        return call

    def marking_mover(t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to("cpu", copy=True)
        out._cmkd_group_device = True
        return out

    for n, fn in originals.items():
        setattr(dist, n, guarded(n, fn))
    if backend == "nccl":
        globals()["to_collective_device"] = marking_mover
    try:
        yield
    finally:
        for n, fn in originals.items():
            setattr(dist, n, fn)
        globals()["to_collective_device"] = mover


def all_gather_object(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] for any picklable obj."""
    if not _initialized():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s obj, on every rank."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank0_logging(logger: logging.Logger) -> logging.Logger:
    """Silence `logger` on every rank but 0, so N processes print one log."""
    main = is_main()
    logger.addFilter(lambda record: main)
    return logger


# ----------------------------------------------------------------------------------------------------------------
# Data and model

def make_sampler(dataset: Dataset, shuffle: bool, drop_last: bool = False, seed: int = 0) -> DistributedSampler | None:
    """A DistributedSampler giving each rank its shard, or None in a single process (DataLoader then shuffles).

    Pass it to DataLoader(sampler=...) with shuffle=False, and call `set_epoch` every epoch so shuffles differ.
    """
    if not (_initialized() and world_size() > 1):
        return None
    return DistributedSampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=seed)


def set_epoch(sampler: Any, epoch: int) -> None:
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def wrap_model(model: nn.Module, device: torch.device | str, find_unused_parameters: bool = False,
               sync_bn: bool = False) -> nn.Module:
    """Move `model` to `device` and, when distributed, wrap it in DDP (which broadcasts rank 0's parameters).

    sync_bn: convert BatchNorm layers to SyncBatchNorm (CUDA only), so statistics span the global batch.
    """
    device = torch.device(device)
    model = model.to(device)
    if not (_initialized() and world_size() > 1):
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [dist_env().local_rank] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                               find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside DDP / DataParallel / torch.compile wrappers (whose state_dict keys are prefixed)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for --master_port in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
