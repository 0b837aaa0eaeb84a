"""Independent runs of a synthetic sweep spread over worker processes (`workers` in the configs).

The vectorised sweeps train all runs of a setting as one batched computation in one process, with one torch thread
(on a shared machine a second OpenMP thread spin-waits and slows everything down). Runs are independent — each is
seeded by its own index — so a sweep of R runs can also be cut into `workers` contiguous blocks of runs, each
computed by a separate process with one thread, and the per-run results concatenated: on W idle cores that is up to
W× faster, and the numbers are those of the single-process sweep (the data, the initial weights and Alg. 1's
permutations depend on the run index and the seed only; the draws of sampled KD losses come from a per-block
stream, so a sampled loss's estimate differs by sampling noise).

`run_blocks(fn, cfg, workers)` calls `fn(block_cfg, first_run)` in the workers, where block_cfg is cfg with `runs`
set to the block's size (and the progress bar off), and returns the results in block order. fn must be a module-level
function (it is pickled by name). CPU only: CUDA cannot be used in forked processes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Callable

import numpy as np
import torch


def split_runs(runs: int, workers: int) -> list[tuple[int, int]]:
    """(first run, number of runs) of at most `workers` contiguous, near-equal, non-empty blocks."""
    if runs < 1 or workers < 1:
        raise ValueError(f"runs and workers must be >= 1, got runs={runs}, workers={workers}")
    sizes = [len(b) for b in np.array_split(np.arange(runs), min(runs, workers))]
    starts = np.cumsum([0] + sizes[:-1])
    return [(int(s), int(n)) for s, n in zip(starts, sizes)]


def _die_with_parent(parent: int) -> None:
    """Make this worker end when its parent does, however the parent ends (kill -9 included): Linux's
    PR_SET_PDEATHSIG delivers SIGKILL at the parent's death; elsewhere (and against the race where the parent died
    before the call) a daemon thread checks every 0.2 s whether the worker was re-parented."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _init_worker(threads: int, parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group: the parent decides and stops us
    torch.set_num_threads(threads)


def run_blocks(fn: Callable[[dict, int], object], cfg: dict, workers: int, *, threads: int = 1,
               log: Callable[[str], None] = print) -> list:
    """fn(block cfg, first run) for every block of runs, in `workers` processes; results in block order.

    The workers end with this process: its kill -9 (see _die_with_parent), or any exception here — a worker's error,
    SIGINT (KeyboardInterrupt), SIGTERM (turned into SystemExit while the blocks run) — terminates them at once."""
    blocks = split_runs(int(cfg["runs"]), workers)
    # fork starts at once and inherits the imported modules; spawn where fork does not exist
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(len(blocks), initializer=_init_worker, initargs=(threads, os.getpid()))
    main_thread = threading.current_thread() is threading.main_thread()   # signal handlers: main thread only
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        pending = {i: pool.apply_async(fn, ({**cfg, "runs": n, "progress": False}, first))
                   for i, (first, n) in enumerate(blocks)}
        results: list = [None] * len(blocks)
        while pending:
            for i, job in list(pending.items()):
                if job.ready():
                    results[i] = job.get()   # a worker's exception is raised here
                    del pending[i]
                    first, n = blocks[i]
                    log(f"worker done: runs {first}–{first + n - 1} ({len(blocks) - len(pending)}/{len(blocks)})")
            time.sleep(0.05)
        pool.close()
        return results
    finally:
        pool.terminate()   # kills whatever still runs (nothing on success)
        pool.join()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def run_sweep_blocks(block_fn: Callable, cfg: dict, device: torch.device, log: Callable[[str], None] = print
                     ) -> tuple[list, int]:
    """A sweep's per-block results and the number of processes used: `block_fn(cfg, 0, device, log)` in this
    process when cfg["workers"] is 1 (or the device is not the CPU: one process drives a GPU, as the log says),
    else `run_blocks` over min(workers, runs) CPU processes with cfg["threads"] (0: 1) torch threads each."""
    workers = min(cfg["workers"], cfg["runs"])
    if workers > 1 and device.type != "cpu":
        log(f"workers: {cfg['workers']} is for CPU runs; on {device} one process drives the device")
        workers = 1
    if workers == 1:
        return [block_fn(cfg, 0, device, log)], 1
    threads = cfg["threads"] or 1
    log(f"{cfg['runs']} runs over {workers} worker processes, {threads} torch thread(s) each")
    return run_blocks(block_fn, cfg, workers, threads=threads, log=log), workers


def concat_runs(parts: list, axis: int = 1):
    """Merge per-block results: arrays are concatenated along the runs axis (`axis`), dicts merged key by key
    (recursively), anything else taken from the first block (settings, layouts: identical in every block)."""
    first = parts[0]
    if isinstance(first, np.ndarray) and first.ndim > axis:
        return np.concatenate(parts, axis)
    if isinstance(first, dict):
        return {k: concat_runs([p[k] for p in parts], axis) for k in first}
    return first
