"""MFH Algorithm 1 (spec §11): which teacher channels carry modality-general decisive information.

Step 1 (`joint_train`): train a teacher-modality and a student-modality network together, with one optimiser on
    CE(f_a(x_a), y) + CE(f_b(x_b), y) + d(f_a(x_a), f_b(x_b)), d = MSE on logits (MFH) or non-target JS (NTDH).
Step 2 (`saliency_vector`): with both networks frozen and the student's output fixed, destroy one teacher channel at a
    place (permute it across the batch, zero it, or replace it by its batch mean) and measure how far the teacher's
    output moves from the student's. A large value means the two modalities agree *through* that channel.
Step 3 (`removal_indices` + `remove_channels`): remove a ratio of the teacher's channels during KD, the least salient
    (mode 1, "modality-general KD"), the most salient (mode 2) or a random subset (mode 0).

Interventions are forward hooks, so any nn.Module works unchanged: a `place` is a submodule name from
`named_modules()` (its output is changed) or "input" (a forward pre-hook on the model changes its first argument).
Layout: `batch_dim` is the samples axis and `channel_dim` the axis whose entries are intervened on (default: the one
right after the batch axis). Axes before the batch axis that are not the channel axis index independent groups: the
runs axis of the vectorised synthetic models, which are feature-major, (R, D, N) → (R, C, N), so they take
batch_dim=2, channel_dim=1, and class_dim=1 for their outputs. Every other axis is part of a sample (positions).

Differences from the reference, on purpose (spec §12): the saliency is averaged over *all* batches, weighted by batch
size (the reference kept only the last batch), and deterministic interventions (zero, mean) are evaluated once rather
than M identical times.
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.divergence import JS_VARIANTS, nontarget_js

INTERVENTIONS = ("permute", "zero", "mean")
DISTANCES = ("mse", "ncjsd", "l1")
REMOVAL_MODES = (-1, 0, 1, 2)
REMOVAL_FILLS = ("zero", "mean")

Distance = str | Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------------
# Places and hooks


def resolve_place(model: nn.Module, place: str) -> nn.Module | None:
    """The submodule whose output is intervened on, or None for "input" (the model's own input)."""
    if place == "input":
        return None
    try:
        return model.get_submodule(place)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        shown = ", ".join(repr(n) for n in names[:20]) + (", ..." if len(names) > 20 else "")
        raise ValueError(f"unknown place {place!r} in {type(model).__name__}; "
                         f"valid places: 'input', {shown}") from None


def _map_first(value, fn):
    """Apply fn to a tensor, or to the first element of a tuple/list of outputs (e.g. an RNN's (output, state))."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return type(value)([fn(value[0]), *value[1:]])
    raise TypeError(f"cannot intervene on a value of type {type(value).__name__}; expected a tensor")


def _hook_at(model: nn.Module, place: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Make every forward of `model` see fn(activation) at `place`; returns a removable handle."""
    module = resolve_place(model, place)
    if module is None:
        def pre_hook(_module, args):
            if not args:
                raise ValueError("place 'input' needs the model's input as its first positional argument")
            return (_map_first(args[0], fn), *args[1:])
        return model.register_forward_pre_hook(pre_hook)
    return module.register_forward_hook(lambda _module, _args, output: _map_first(output, fn))


def _axes(x: torch.Tensor, batch_dim: int, channel_dim: int | None) -> tuple[int, int]:
    """(batch axis, channel axis) of x, both non-negative; channel_dim=None means the axis right after the batch."""
    shape = tuple(x.shape)
    if channel_dim is None:
        if not 0 <= batch_dim < x.dim() - 1:
            raise ValueError(f"batch_dim={batch_dim} leaves no channel axis in a tensor of shape {shape}")
        return batch_dim, batch_dim + 1
    if not 0 <= batch_dim < x.dim():
        raise ValueError(f"batch_dim={batch_dim} is not an axis of a tensor of shape {shape}")
    if not -x.dim() <= channel_dim < x.dim() or channel_dim % x.dim() == batch_dim:
        raise ValueError(f"channel_dim={channel_dim} must be an axis other than batch_dim={batch_dim} "
                         f"in a tensor of shape {shape}")
    return batch_dim, channel_dim % x.dim()


def channel_count(model: nn.Module, place: str, example_input: torch.Tensor, batch_dim: int = 0,
                  channel_dim: int | None = None) -> int:
    """Size of the channel axis at `place`, read from one forward of `example_input`.

    channel_dim: the channel axis of the activation at `place` (negative counts from the end); None means
    batch_dim + 1.
    """
    sizes: list[int] = []

    def record(a: torch.Tensor) -> torch.Tensor:
        sizes.append(a.shape[_axes(a, batch_dim, channel_dim)[1]])
        return a

    was_training = model.training
    handle = _hook_at(model, place, record)
    try:
        model.eval()  # no BatchNorm statistics are updated by this probe
        with torch.no_grad():
            model(example_input)
    finally:
        handle.remove()
        model.train(was_training)
    if not sizes:
        raise ValueError(f"place {place!r} was not reached by the forward pass")
    return sizes[0]


# ----------------------------------------------------------------------------------------------------------------------
# Interventions


def _check_op(op: str) -> None:
    if op not in INTERVENTIONS:
        raise ValueError(f"op must be one of {INTERVENTIONS}, got {op!r}")


def _randperm(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    # Drawn on the generator's own device so a seeded CPU generator gives the same permutations whatever `device` is.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def _channel_index(channels, device) -> torch.Tensor:
    return torch.as_tensor(channels, dtype=torch.long, device=device).reshape(-1)


def intervene(x: torch.Tensor, channels, op: str, batch_dim: int = 0,
              generator: torch.Generator | None = None, *, channel_dim: int | None = None) -> torch.Tensor:
    """A copy of x with `channels` (entries of axis channel_dim) destroyed by `op`; x itself is never modified.

    permute: one random permutation π of the batch axis per call, y[..., i, c, ...] = x[..., π(i), c, ...].
    zero:    y[..., c, ...] = 0 (NTDH's "freeze").
    mean:    y[..., c, ...] = mean over the batch axis of x[..., c, ...] (MFH's "freeze").
    channel_dim: the channel axis, any axis but batch_dim (negative counts from the end); None means batch_dim + 1.
    Axes before batch_dim other than the channel axis are independent groups: the mean is taken per group (π is
    shared by the groups). E.g. feature-major runs (R, D, N) use batch_dim=2, channel_dim=1.
    """
    _check_op(op)
    b, c = _axes(x, batch_dim, channel_dim)
    index = torch.unique(_channel_index(channels, x.device))  # duplicates would be written twice with the same value
    if index.numel() == 0:
        return x.clone()
    n_channels = x.shape[c]
    if index.min() < 0 or index.max() >= n_channels:
        raise ValueError(f"channels must lie in [0, {n_channels}), got {index.tolist()}")
    chosen = x.index_select(c, index)
    if op == "zero":
        replaced = torch.zeros_like(chosen)
    elif op == "mean":
        replaced = chosen.mean(b, keepdim=True).expand_as(chosen)
    else:
        replaced = chosen.index_select(b, _randperm(x.shape[b], generator, x.device))
    return x.index_copy(c, index, replaced)


class Intervention:
    """While active, every forward of `model` has `op` applied to `channels` at `place`.

        with Intervention(teacher, "fc1", [3, 7], "permute", generator=g):
            logits = teacher(x)   # a fresh permutation per forward

    batch_dim / channel_dim: the batch and channel axes of the activation at `place`, as in `intervene`.
    """

    def __init__(self, model: nn.Module, place: str, channels, op: str, batch_dim: int = 0,
                 generator: torch.Generator | None = None, *, channel_dim: int | None = None):
        _check_op(op)
        resolve_place(model, place)  # fail on a bad place now, not at __enter__
        self.model, self.place, self.channels, self.op = model, place, channels, op
        self.batch_dim, self.channel_dim, self.generator = batch_dim, channel_dim, generator
        self._handle = None

    def _apply(self, a: torch.Tensor) -> torch.Tensor:
        return intervene(a, self.channels, self.op, self.batch_dim, self.generator, channel_dim=self.channel_dim)

    def __enter__(self) -> "Intervention":
        self._handle = _hook_at(self.model, self.place, self._apply)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def remove_channels(model: nn.Module, place: str, channels, fill: str = "zero", batch_dim: int = 0, *,
                    channel_dim: int | None = None):
    """Persistently remove `channels` at `place` (Alg. 1 step 3): zero fill (NTDH) or batch-mean fill (MFH).

    batch_dim / channel_dim: the batch and channel axes of the activation at `place`, as in `intervene`.
    Returns the hook handle; `handle.remove()` restores the model. The channel ids are checked against the channel
    count at the first forward, when that count is first known.
    """
    if fill not in REMOVAL_FILLS:
        raise ValueError(f"fill must be one of {REMOVAL_FILLS}, got {fill!r}")
    resolve_place(model, place)
    index = _channel_index(channels, "cpu")
    checked = False

    def remove(a: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        if not checked:
            n_channels = a.shape[_axes(a, batch_dim, channel_dim)[1]]
            if index.numel() and (index.min() < 0 or index.max() >= n_channels):
                raise ValueError(f"channels to remove at place {place!r} must lie in [0, {n_channels}) "
                                 f"({n_channels} channels there), got min {index.min().item()}, "
                                 f"max {index.max().item()}")
            checked = True
        return intervene(a, index, fill, batch_dim, channel_dim=channel_dim)

    return _hook_at(model, place, remove)


# ----------------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 2: saliency


def _expand_copies(a: torch.Tensor, channels: torch.Tensor, op: str, batch_dim: int, channel_dim: int | None,
                   generator: torch.Generator | None) -> torch.Tensor:
    """(..., B, ...) → (..., k·B, ...): copy j is `a` with channel channels[j] (of axis channel_dim) intervened.

    Equivalent to concatenating intervene(a, [c_j], op, batch_dim, channel_dim=channel_dim) along the batch axis for
    j = 0..k−1 (same random draws, in the same order), but written with one advanced-index assignment instead of k
    full clones.
    """
    b, c = _axes(a, batch_dim, channel_dim)
    k, n = channels.numel(), a.shape[b]
    channels = channels.to(a.device)
    # A real copy even for k = 1 (a plain view would let the assignments below write into `a`). The copy axis is
    # inserted right before the batch axis, so a channel axis after the batch axis moves one place right.
    copies = a.unsqueeze(b).expand(*a.shape[:b], k, *a.shape[b:]).clone(memory_format=torch.contiguous_format)
    # Bring (copy, channel) to the front: view[j, c_j] is then copy j's channel c_j, shaped like `a` without c.
    view = copies.movedim((b, c + (c > b)), (0, 1))
    copy_ids = torch.arange(k, device=a.device)
    clean = a.movedim(c, 0)[channels]  # (k, ...): the clean channel c_j for each copy, same layout as view[j, c_j]
    batch = 1 + b - (c < b)  # the batch axis of `clean`
    if op == "zero":
        view[copy_ids, channels] = 0
    elif op == "mean":
        view[copy_ids, channels] = clean.mean(batch, keepdim=True)
    else:  # permute: each copy gets its own permutation, drawn in copy order
        perms = torch.stack([_randperm(n, generator, a.device) for _ in range(k)])  # (k, B)
        shuffled = clean.movedim(batch, 1)[copy_ids[:, None], perms]  # (k, B, ...)
        view[copy_ids, channels] = shuffled.movedim(1, batch)
    return copies.flatten(b, b + 1)


def _leading_linear(model: nn.Module) -> nn.Linear | None:
    """The nn.Linear that receives the model's input: the model itself or the first entry of (nested)
    nn.Sequential; None otherwise."""
    m = model
    while isinstance(m, nn.Sequential) and len(m):
        m = m[0]
    return m if type(m) is nn.Linear else None


def _rank1_layout(x: torch.Tensor, batch_dim: int, channel_dim: int | None) -> bool:
    """Whether the input's channel axis is nn.Linear's input-feature axis: (B, D) with batch_dim 0."""
    return x.dim() == 2 and _axes(x, batch_dim, channel_dim) == (0, 1)


def _rank1_delta(clean: torch.Tensor, op: str, perms: torch.Tensor | None) -> torch.Tensor:
    """x̃_c − x_c for the intervened channels, clean (…, k, n) with the samples last; perms (k, n) for "permute"."""
    if op == "zero":
        return -clean
    if op == "mean":
        return clean.mean(-1, keepdim=True) - clean
    return clean.gather(-1, perms.expand_as(clean)).sub_(clean)


def _rank1_copies(layer: nn.Linear, x: torch.Tensor, out: torch.Tensor, channels: torch.Tensor, op: str,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The first linear layer's output on the k intervened copies of its input (B, D) that `_expand_copies` would
    build (the same random draws, in the same order), from its clean output (B, H) alone.

    Changing input channel c from x_c to x̃_c changes W x + b by the rank-1 term W[:, c] ⊗ (x̃_c − x_c), so a copy
    costs one multiply-add of the layer's output size, and neither the (k × input) copies nor the k first-layer
    matmuls are made. The copy axis goes right before the batch axis, as in `_expand_copies`: (k·B, H).
    """
    channels = channels.to(x.device)
    clean = x[:, channels].t()                                                            # (k, B)
    perms = None
    if op == "permute":
        perms = torch.stack([_randperm(clean.shape[-1], generator, x.device) for _ in range(channels.numel())])
    delta = _rank1_delta(clean, op, perms)
    w = layer.weight[:, channels].t()                                                     # (k, H)
    return torch.addcmul(out.unsqueeze(0), delta.unsqueeze(-1), w.unsqueeze(1)).flatten(0, 1)


def _class_axis(out: torch.Tensor, batch_dim: int, class_dim: int) -> int:
    """The class axis of a model output as a non-negative index; it must differ from the batch (samples) axis."""
    if not -out.dim() <= class_dim < out.dim() or class_dim % out.dim() == batch_dim:
        raise ValueError(f"class_dim={class_dim} must be an axis other than batch_dim={batch_dim} "
                         f"of the model output, shape {tuple(out.shape)}")
    return class_dim % out.dim()


def _without(shape: torch.Size, dim: int) -> torch.Size:
    return shape[:dim] + shape[dim + 1:]


def _nontarget_index(labels: torch.Tensor, n_classes: int, class_dim: int) -> torch.Tensor:
    """Ids of the C − 1 non-target classes of every sample, increasing, on a new axis class_dim: c' + [c' ≥ y]."""
    shape = [1] * (labels.dim() + 1)
    shape[class_dim] = n_classes - 1
    ar = torch.arange(n_classes - 1, device=labels.device).view(shape)
    return ar + (ar >= labels.long().unsqueeze(class_dim)).long()


class _FixedStudent:
    """The student's output of one batch — fixed during step 2 — with what every copy's distance needs computed
    once: for "ncjsd", the student's non-target log-probabilities (and P log P), so each copy costs one gather and
    one log-softmax over its own C − 1 non-target logits (the value of common.divergence.nontarget_js)."""

    def __init__(self, h_s: torch.Tensor, y: torch.Tensor, distance: Distance, variant: str, batch_dim: int,
                 class_dim: int):
        self.h, self.y, self.distance, self.variant = h_s, y, distance, variant
        self.batch_dim, self.class_dim = batch_dim, class_dim
        if distance == "ncjsd":
            labels = y.expand(_without(h_s.shape, class_dim))
            index = _nontarget_index(labels, h_s.shape[class_dim], class_dim)
            self.log_s = h_s.gather(class_dim, index).log_softmax(class_dim).unsqueeze(batch_dim)
            self.p_s = self.log_s.exp()
            self.plogp_s = self.p_s * self.log_s
            self.index = index.unsqueeze(batch_dim)   # broadcast over the copy axis

    def distances(self, h_t: torch.Tensor) -> torch.Tensor:
        """Distance of each intervened copy to the student, averaged over samples (and classes / positions).

        h_t is the teacher's output with the k copies on a new axis right before the batch axis, (..., k, B, ...).
        Returns (..., k), the leading axes being the group axes of h_s (before batch_dim, class axis excluded).
        """
        b, h_s = self.batch_dim, self.h
        if callable(self.distance):
            per_copy = [torch.as_tensor(self.distance(h_t.select(b, j), h_s, self.y)) for j in range(h_t.shape[b])]
            return torch.stack(per_copy, -1)
        classes = self.class_dim + (self.class_dim > b)  # the class axis of h_t
        copy_axis = b - (self.class_dim < b)  # the copy axis once the class axis is reduced away
        if self.distance in ("mse", "l1"):
            diff = h_t - h_s.unsqueeze(b)
            per_sample = (diff.pow_(2) if self.distance == "mse" else diff.abs_()).mean(classes)
        else:
            shape = list(h_t.shape)
            shape[classes] -= 1
            log_t = h_t.gather(classes, self.index.expand(shape)).log_softmax(classes)
            p_t = log_t.exp()
            s = p_t + self.p_s
            # M = (P + Q)/2 underflows to 0 only where P and Q both do: those terms are 0 either way
            log_m = (s * 0.5).clamp_min_(torch.finfo(s.dtype).tiny).log_()
            if self.variant == "textbook":   # ½[KL(P‖M) + KL(Q‖M)] = ½ Σ [P log P + Q log Q − (P + Q) log M]
                terms = (p_t * log_t).add_(self.plogp_s).sub_(s.mul_(log_m))
            else:                            # the reference's ½[KL(M‖P) + KL(M‖Q)] = ½ Σ M (2 log M − log P − log Q)
                terms = (log_m * 2).sub_(log_t).sub_(self.log_s).mul_(s.mul_(0.5))
            per_sample = terms.sum(classes).mul_(0.5)
        return per_sample.flatten(copy_axis + 1).mean(-1)  # mean over the batch (and positions)


def minmax_normalize(s: torch.Tensor) -> torch.Tensor:
    """Min-max normalise over the last (channel) axis; a constant row maps to zeros rather than NaN."""
    low, high = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    spread = high - low
    return torch.where(spread > 0, (s - low) / spread.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))


def _check_distance(distance: Distance) -> None:
    if not callable(distance) and distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES} or a callable, got {distance!r}")


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
        "ncjsd" is the non-target JS over the class axis averaged over samples; a callable distance gets the outputs
        as they are, (h_t, h_s, y), and returns one value per group.
    Axes before batch_dim that are neither the channel nor the class axis are independent groups (one saliency row
    each); the feature-major vectorised models, (R, D, N) → (R, C, N), take batch_dim=2, channel_dim=1, class_dim=1
    and give (R, C).

    `chunk` channels are evaluated in one teacher forward: the hook at `place` replaces the activation (..., B, ...)
    by k = chunk intervened copies stacked along the batch axis, so everything after `place` runs once on k·B samples
    while everything before it runs on the B original samples only (once per chunk, i.e. ~1/k of the naive cost).
    This needs every layer after `place` to be per-sample (eval mode) and `place` to be the only path from the input
    to the output (true for "input" and for sequential models; a skip connection around `place` fails on shapes).

    rank1: at place "input" of a model whose first layer is an nn.Linear on (B, D), build the k copies at that
    layer's output by a rank-1 update of its clean output instead of copying the input (`_rank1_copies`): the same
    numbers and random draws, up to float rounding, at a fraction of the cost. False forces the copy path.
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
        lead = _leading_linear(teacher) if rank1 and place == "input" else None
        self.lead = lead if lead is not None and _rank1_layout(x_t, batch_dim, channel_dim) else None

    def distances(self, x_t: torch.Tensor, fixed: "_FixedStudent", op: str, chunk: int,
                  generator: torch.Generator | None) -> torch.Tensor:
        """One repeat: the distance of every channel's intervened output to the student, (..., C) float64."""
        b, batch_size = self.batch_dim, x_t.shape[self.batch_dim]
        pieces = []
        for start in range(0, self.n_channels, chunk):
            channels = torch.arange(start, min(start + chunk, self.n_channels), device=x_t.device)
            if self.lead is not None:
                handle = self.lead.register_forward_hook(
                    lambda m, args, out, ch=channels: _rank1_copies(m, args[0], out, ch, op, generator))
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


# ----------------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 3: which channels to remove


def removal_indices(saliency: torch.Tensor, mode: int, ratio: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Channel ids to remove, k = int(ratio·C), returned in increasing order (last axis; leading axes are groups).

    mode 0: a random subset of size k; 1: the k lowest saliencies (keeps the modality-general channels); 2: the k
    highest (keeps the modality-specific ones); -1: none. Ties go to the lower index (stable sort).
    """
    if mode not in REMOVAL_MODES:
        raise ValueError(f"mode must be one of {REMOVAL_MODES}, got {mode!r}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio!r}")
    n_channels = saliency.shape[-1]
    k = int(ratio * n_channels) if mode >= 0 else 0
    lead = saliency.shape[:-1]
    if k == 0:
        return torch.empty(*lead, 0, dtype=torch.long, device=saliency.device)
    if mode == 0:
        rows = [_randperm(n_channels, generator, saliency.device)[:k] for _ in range(lead.numel())]
        chosen = torch.stack(rows).reshape(*lead, k)
    else:
        chosen = torch.sort(saliency, dim=-1, descending=(mode == 2), stable=True).indices[..., :k]
    return chosen.sort(-1).values


# ----------------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 1: joint unimodal training


def _agreement(out_a: torch.Tensor, out_b: torch.Tensor, y: torch.Tensor, distance: Distance, variant: str,
               class_dim: int = -1) -> torch.Tensor:
    """d(out_a, out_b) averaged over samples (and classes for mse / l1); the class axis of the outputs is class_dim."""
    if callable(distance):
        return distance(out_a, out_b, y).mean()
    if distance == "mse":
        return F.mse_loss(out_a, out_b)
    if distance == "l1":
        return F.l1_loss(out_a, out_b)
    class_dim %= out_a.dim()
    labels = y.expand(_without(out_a.shape, class_dim))
    return nontarget_js(out_b, out_a, labels, variant, dim=class_dim).mean()


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, class_dim: int = -1) -> torch.Tensor:
    """Mean CE over every sample; the class axis is class_dim, every other axis a sample (common.divergence's
    convention), and y is broadcast to the logits' shape without the class axis."""
    class_dim %= logits.dim()
    labels = y.expand(_without(logits.shape, class_dim))
    if class_dim == logits.dim() - 1:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    # F.cross_entropy takes the classes on axis 1, e.g. (R, C, N) with labels (R, N), as they are.
    return F.cross_entropy(logits.movedim(class_dim, 1), labels)


def joint_train(model_a: nn.Module, model_b: nn.Module, batches_fn: Callable[[], Iterable], *, epochs: int, lr: float,
                momentum: float = 0.9, distance: Distance = "mse", variant: str = "textbook", device=None,
                progress: bool = False, loss_fn=None, class_dim: int = -1) -> list[float]:
    """Alg. 1 step 1: one SGD over both nets on CE(a) + CE(b) + d(a, b); returns the mean loss of each epoch.

    batches_fn() gives one epoch of (x_a, x_b, y). d is MSE on logits (MFH) or the non-target JS "ncjsd" (NTDH).
    class_dim: the class axis of the model outputs (default last; 1 for the feature-major vectorised models'
    (R, C, N), with y (R, N)). Every other axis is a sample: the default CE and d average over all of them, runs
    included, so each run's gradient is its own loss's gradient divided by R.
    loss_fn(out_a, out_b, y), when given, replaces the whole default loss (e.g. run-summed losses of the vectorised
    synthetic models). Both models are moved to `device` when given, and left in eval mode afterwards.
    """
    if loss_fn is None:
        _check_distance(distance)
    if device is not None:
        model_a.to(device)
        model_b.to(device)
    # One optimiser over both parameter sets; a parameter shared by the two models is stepped once.
    params = list({id(p): p for p in itertools.chain(model_a.parameters(), model_b.parameters())}.values())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    model_a.train()
    model_b.train()
    history: list[float] = []
    bar = tqdm(range(epochs), desc="joint training", disable=not progress, leave=False)
    for _ in bar:
        losses = []
        for x_a, x_b, y in batches_fn():
            if device is not None:
                x_a, x_b, y = x_a.to(device), x_b.to(device), y.to(device)
            out_a, out_b = model_a(x_a), model_b(x_b)
            if loss_fn is not None:
                loss = loss_fn(out_a, out_b, y)
            else:
                loss = (_cross_entropy(out_a, y, class_dim) + _cross_entropy(out_b, y, class_dim)
                        + _agreement(out_a, out_b, y, distance, variant, class_dim))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if not losses:
            raise ValueError("batches_fn() yielded no batches")
        history.append(sum(losses) / len(losses))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model_a.eval()
    model_b.eval()
    return history
