"""Algorithm 1, step 2 (MFH, Algorithm 1): the saliency of every teacher channel at a place — how far the teacher's
output moves from the fixed student's when that channel is destroyed."""
from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from common.divergence import JS_VARIANTS
from common.saliency.copies import _expand_copies
from common.saliency.distances import Distance, _check_distance, _class_axis, _FixedStudent, minmax_normalize
from common.saliency.hooks import _check_op, _hook_at, channel_count
from common.saliency.rank1 import find_site


def check_saliency_args(op: str, distance: Distance, variant: str, repeats: int, chunk: int) -> None:
    _check_op(op)
    _check_distance(distance)
    if variant not in JS_VARIANTS:
        raise ValueError(f"variant must be one of {JS_VARIANTS}, got {variant!r}")
    if repeats < 1 or chunk < 1:
        raise ValueError(f"repeats and chunk must be >= 1, got repeats={repeats}, chunk={chunk}")


def saliency_vector(teacher: nn.Module, student: nn.Module, batches: Iterable, place: str, *, op: str = "permute",
                    distance: Distance = "mse", repeats: int = 10, batch_dim: int = 0,
                    channel_dim: int | None = None, class_dim: int = -1, chunk: int = 64,
                    generator: torch.Generator | None = None, normalize: bool = True, variant: str = "textbook",
                    rank1: bool = True, progress: bool = False, desc: str | None = None) -> torch.Tensor:
    """Per-channel saliency of the teacher at `place` (Alg. 1 step 2): shape (C,), or (R, C) with group axes.

    batches: iterable of (x_teacher, x_student, y), already on the models' device; y holds one label per sample
    (shaped like the outputs without their class axis, or broadcastable to that).
    saliency[c] = mean over batches (weighted by batch size) and repeats of d(teacher(x_t) with channel c destroyed,
    student(x_s), y), min-max normalised over channels when `normalize`.

    batch_dim: the samples axis, of the inputs, of the activation at `place` and of the model outputs alike.
    channel_dim: the channel axis of the activation at `place` (negative counts from the end); None means
        batch_dim + 1.
    class_dim: the class axis of the model outputs (default last). "mse" and "l1" average over samples and classes,
        "ncjsd" is the non-target JS over the class axis averaged over samples, "js" the JS of the full class
        distributions (target included) averaged over samples; a callable distance gets the outputs
        as they are, (h_t, h_s, y), and returns one value per group.
    Axes before batch_dim that are neither the channel nor the class axis are independent groups (one saliency row
    each); the feature-major vectorised models, (R, D, N) → (R, C, N), take batch_dim=2, channel_dim=1, class_dim=1
    and give (R, C).

    `chunk` channels are evaluated in one teacher forward: the hook at `place` replaces the activation (..., B, ...)
    by k = chunk intervened copies stacked along the batch axis, so everything after `place` runs once on k·B samples
    while everything before it runs on the B original samples only (once per chunk, i.e. ~1/k of the naive cost).
    This needs every layer after `place` to be per-sample (eval mode) and `place` to be the only path from the input
    to the output (true for "input" and for sequential models; a skip connection around `place` fails on shapes).

    rank1: where the activation at `place` feeds one nn.Linear and nothing else (the input of an MLP, or a hidden
    activation such as an MLP's post-activation output), build the k copies at that layer's output by a rank-1
    update of its clean output, with everything before that layer computed once per batch (common.saliency.rank1):
    the same numbers and random draws as the copy path, up to float rounding, at a fraction of the cost. Whether it
    is exact is decided once per call from a traced forward of the first batch; otherwise the copy path runs. That
    path evaluates at most `chunk` channels per forward, fewer when a block of copies would not fit in cache
    (common.saliency.rank1.BLOCK_ENTRIES). False forces the copy path.
    """
    check_saliency_args(op, distance, variant, repeats, chunk)
    # Zero and mean fills are deterministic: M repeats would give M identical values.
    n_repeats = repeats if op == "permute" else 1
    n_batches = len(batches) if hasattr(batches, "__len__") else None  # for the progress bar only
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("saliency_vector needs at least one batch")
    modes = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    total, n_samples, probe = None, 0, None
    try:
        with torch.no_grad():
            for x_t, x_s, y in tqdm(itertools.chain([first], batches), total=n_batches, desc=desc or f"saliency@{place}",
                                    disable=not progress, leave=False):
                h_s = student(x_s)  # before any hook exists, in case teacher and student are one module
                if probe is None:   # from the first batch: the layout is the same for every batch
                    probe = _Probe(teacher, place, x_t, h_s, batch_dim, channel_dim, class_dim, rank1)
                fixed = _FixedStudent(h_s, y, distance, variant, batch_dim, probe.classes)
                probe.start_batch(x_t)
                sums = sum(probe.distances(x_t, fixed, op, chunk, generator) for _ in range(n_repeats))
                batch_size = x_t.shape[batch_dim]
                weighted = sums * (batch_size / n_repeats)
                total = weighted if total is None else total + weighted
                n_samples += batch_size
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    saliency = (total / n_samples).to(h_s.dtype if h_s.is_floating_point() else torch.float32)
    return minmax_normalize(saliency) if normalize else saliency


class _Probe:
    """The teacher, the place and the layout of one saliency computation: intervened forwards, chunk by chunk."""

    def __init__(self, teacher: nn.Module, place: str, x_t: torch.Tensor, h_s: torch.Tensor, batch_dim: int,
                 channel_dim: int | None, class_dim: int, rank1: bool):
        self.teacher, self.place, self.batch_dim, self.channel_dim = teacher, place, batch_dim, channel_dim
        self.n_channels = channel_count(teacher, place, x_t, batch_dim, channel_dim)
        self.classes = _class_axis(h_s, batch_dim, class_dim)
        self.site = find_site(teacher, place, x_t, batch_dim, channel_dim) if rank1 else None

    def start_batch(self, x_t: torch.Tensor) -> None:
        """The rank-1 path's clean forward of a new batch (nothing to do on the copy path)."""
        if self.site is not None:
            self.site.capture(x_t)

    def distances(self, x_t: torch.Tensor, fixed: "_FixedStudent", op: str, chunk: int,
                  generator: torch.Generator | None) -> torch.Tensor:
        """One repeat: the distance of every channel's intervened output to the student, (..., C) float64."""
        b, batch_size = self.batch_dim, x_t.shape[self.batch_dim]
        pieces = []
        step = chunk if self.site is None else self.site.block(chunk)
        for start in range(0, self.n_channels, step):
            channels = torch.arange(start, min(start + step, self.n_channels), device=x_t.device)
            if self.site is not None:
                out = self.site.forward_copies(x_t, channels, op, generator)
            else:
                expand = lambda a, ch=channels: _expand_copies(a, ch, op, b, self.channel_dim, generator)
                handle = _hook_at(self.teacher, self.place, expand)
                try:
                    out = self.teacher(x_t)
                finally:
                    handle.remove()
            k = channels.numel()
            if out.shape[b] != k * batch_size:
                raise ValueError(f"the output's batch axis has {out.shape[b]} samples, expected {k}×{batch_size}: "
                                 f"place {self.place!r} is not on the only path to the output")
            pieces.append(fixed.distances(out.unflatten(b, (k, batch_size))).double())
        return torch.cat(pieces, -1)
