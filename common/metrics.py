"""Evaluation metrics: accuracy, a confusion matrix for (m)IoU, and the concordance correlation coefficient (CCC)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from common.ddp import all_reduce_sum


def accuracy(logits: torch.Tensor, labels: torch.Tensor, class_dim: int = 1) -> float:
    """Fraction of arg-max predictions equal to the labels; (B, C) or dense (B, C, H, W) with class_dim=1."""
    return (logits.argmax(class_dim) == labels).float().mean().item()


class ConfusionMatrix:
    """Accumulated (C, C) int64 counts; **rows are ground truth, columns are predictions**: mat[t, p].

    ignore_index: target value(s) to skip (e.g. 0 "unlabelled" on SemanticKITTI, 255 on VOC). Targets outside
    [0, C) are skipped as well. Ignored classes are left out of `mean_iou` by default.
    """

    def __init__(self, num_classes: int, ignore_index: int | Sequence[int] | None = None,
                 device: torch.device | str | None = None):
        self.num_classes = num_classes
        if ignore_index is None:
            ignore_index = []
        elif isinstance(ignore_index, int):
            ignore_index = [ignore_index]
        self.ignore_index = sorted(set(int(i) for i in ignore_index))
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> "ConfusionMatrix":
        """Add predicted class ids `pred` against `target` (same number of elements, any shape)."""
        C = self.num_classes
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        if pred.numel() != target.numel():
            raise ValueError(f"ConfusionMatrix.update: pred has {pred.numel()} elements, target {target.numel()}")
        keep = (target >= 0) & (target < C)
        if self.ignore_index:
            keep &= ~torch.isin(target, torch.tensor(self.ignore_index, device=target.device))
        pred, target = pred[keep], target[keep]
        if pred.numel() and (pred.min() < 0 or pred.max() >= C):
            raise ValueError(f"ConfusionMatrix.update: predictions must be class ids in [0, {C})")
        # One bincount over the flattened (t, p) cell index fills the whole matrix at once.
        self.mat += torch.bincount(target * C + pred, minlength=C * C).view(C, C)
        return self

    def all_reduce(self) -> "ConfusionMatrix":
        """Sum the counts over DDP ranks (a no-op in a single process)."""
        self.mat = all_reduce_sum(self.mat)
        return self

    def reset(self) -> None:
        self.mat.zero_()

    # Per-class scores, float64, NaN where the denominator is zero (0 / 0 in floating point).
    def _parts(self):
        m = self.mat.double()
        tp = m.diag()
        return tp, m.sum(0) - tp, m.sum(1) - tp  # tp, fp (predicted c, truth not c), fn (truth c, predicted not c)

    def iou(self) -> torch.Tensor:
        """tp / (tp + fp + fn) per class; NaN for a class absent from both ground truth and predictions."""
        tp, fp, fn = self._parts()
        return tp / (tp + fp + fn)

    def precision(self) -> torch.Tensor:
        tp, fp, _ = self._parts()
        return tp / (tp + fp)

    def recall(self) -> torch.Tensor:
        tp, _, fn = self._parts()
        return tp / (tp + fn)

    def mean_iou(self, classes: Sequence[int] | None = None) -> float:
        """Mean IoU over `classes` (default: every class not ignored), skipping NaN (absent) classes."""
        if classes is None:
            classes = [c for c in range(self.num_classes) if c not in self.ignore_index]
        return torch.nanmean(self.iou()[list(classes)]).item()

    def pixel_accuracy(self) -> float:
        """Fraction of counted elements predicted correctly (NaN when nothing was counted)."""
        m = self.mat.double()
        return (m.diag().sum() / m.sum()).item()

    def as_dict(self, class_names: Sequence[str] | None = None) -> dict:
        """{"miou", "pixel_accuracy", "iou": {name: v}, "precision": {...}, "recall": {...}}, plain floats."""
        names = list(class_names) if class_names is not None else [str(c) for c in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"as_dict: {len(names)} class names for {self.num_classes} classes")

        def per_class(t):
            return dict(zip(names, t.tolist()))

        return {"miou": self.mean_iou(), "pixel_accuracy": self.pixel_accuracy(), "iou": per_class(self.iou()),
                "precision": per_class(self.precision()), "recall": per_class(self.recall())}


# ----------------------------------------------------------------------------------------------------------------
# Concordance correlation coefficient (Lin, 1989): agreement of two series in correlation, scale and offset.
#   CCC = 2 cov(p, g) / (var(p) + var(g) + (mean(p) - mean(g))^2), population (biased) moments.

def ccc(pred: torch.Tensor, gold: torch.Tensor, dim: int | None = -1, eps: float = 1e-8) -> torch.Tensor:
    """Differentiable CCC along `dim` (None: over all elements); `eps` keeps constant inputs finite."""
    if dim is None:
        pred, gold, dim = pred.reshape(-1), gold.reshape(-1), -1
    mu_p, mu_g = pred.mean(dim, keepdim=True), gold.mean(dim, keepdim=True)
    dp, dg = pred - mu_p, gold - mu_g
    cov = (dp * dg).mean(dim)
    var_p, var_g = dp.pow(2).mean(dim), dg.pow(2).mean(dim)
    return 2 * cov / (var_p + var_g + (mu_p - mu_g).squeeze(dim).pow(2) + eps)


def ccc_np(pred, gold) -> float:
    """CCC over all elements in float64 numpy (for evaluation); NaN when both inputs are the same constant."""
    p, g = np.asarray(pred, dtype=np.float64).ravel(), np.asarray(gold, dtype=np.float64).ravel()
    cov = np.mean((p - p.mean()) * (g - g.mean()))
    denom = p.var() + g.var() + (p.mean() - g.mean()) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")


def ccc_loss(pred: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """1 - CCC over all elements: 0 for perfect agreement, up to 2 for perfect anti-agreement."""
    return 1 - ccc(pred.reshape(-1), gold.reshape(-1), dim=-1)


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (scipy.stats.rankdata's default)."""
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])      # first index of each tie block
    ends = np.r_[starts[1:], v.size]
    ranks = np.empty(v.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x, y) -> tuple[float, float]:
    """Spearman's rank correlation ρ and its two-sided p-value (t-distribution with n − 2 degrees of freedom), as
    scipy.stats.spearmanr; NaN for constant input or n < 3. Written out so that a run does not import scipy.stats
    (over a second of start-up) for one number."""
    from scipy.special import stdtr

    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.size != y.size:
        raise ValueError(f"spearman: x has {x.size} values, y has {y.size}")
    n = x.size
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    rho = float(np.clip(np.corrcoef(_average_ranks(x), _average_ranks(y))[0, 1], -1.0, 1.0))
    if abs(rho) == 1.0:
        return rho, 0.0
    t = rho * np.sqrt((n - 2) / (1 - rho * rho))
    return rho, float(2 * stdtr(n - 2, -abs(t)))


def spearman_summary(x: np.ndarray, y: np.ndarray) -> dict:
    """(settings, runs) arrays → ρ over every run of every setting (with p and n), and ρ over the per-setting
    means (NaN with fewer than 3 settings): the NTDH check of the synthetic experiments."""
    rho, p = spearman(x, y)
    rho_means = spearman(x.mean(1), y.mean(1))[0] if x.shape[0] > 2 else float("nan")
    return {"rho": rho, "p": p, "n": int(x.size), "rho_means": rho_means}
