"""The distances of Algorithm 1's step 2 between each intervened teacher output and the fixed student output: MSE and
L1 on the outputs (MFH), the non-target JS (NTDH's ncjsd) or the JS of the full class distributions (js, target
included), with what every copy needs computed once."""
from __future__ import annotations

from typing import Callable

import torch

DISTANCES = ("mse", "ncjsd", "js", "l1")
Distance = str | Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _log_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x − max − log Σ exp(x − max) over `dim`: x.log_softmax(dim) up to float rounding, but on CPU about 4× faster
    for the few (≤ ~20) classes of a saliency copy block, where log_softmax's kernel is dominated by per-row overhead
    (it was a sixth of the rank-1 path's time in bench/saliency_rank1.py)."""
    shifted = x - x.amax(dim, keepdim=True)
    return shifted.sub_(shifted.exp().sum(dim, keepdim=True).log_())


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
    one log-softmax over its own C − 1 non-target logits (the value of common.divergence.nontarget_js); for "js",
    the same over all C classes (common.divergence.full_js)."""

    def __init__(self, h_s: torch.Tensor, y: torch.Tensor, distance: Distance, variant: str, batch_dim: int,
                 class_dim: int):
        self.h, self.y, self.distance, self.variant = h_s, y, distance, variant
        self.batch_dim, self.class_dim = batch_dim, class_dim
        if distance in ("ncjsd", "js"):
            logits, self.index = h_s, None            # js: every class takes part
            if distance == "ncjsd":
                labels = y.expand(_without(h_s.shape, class_dim))
                index = _nontarget_index(labels, h_s.shape[class_dim], class_dim)
                logits, self.index = h_s.gather(class_dim, index), index.unsqueeze(batch_dim)  # over the copy axis
            self.log_s = logits.log_softmax(class_dim).unsqueeze(batch_dim)
            self.p_s = self.log_s.exp()
            self.plogp_s = self.p_s * self.log_s

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
            if self.index is None:
                log_t = _log_softmax(h_t, classes)
            else:
                shape = list(h_t.shape)
                shape[classes] -= 1
                log_t = _log_softmax(h_t.gather(classes, self.index.expand(shape)), classes)
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
