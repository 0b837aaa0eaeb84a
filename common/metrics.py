"""Evaluation metrics: accuracy, a confusion matrix for (m)IoU, the concordance correlation coefficient (CCC) and the
rank correlations of the NTDH check (pooled, within-setting and setting-controlled Spearman ρ with bootstrap
intervals)."""
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


# ----------------------------------------------------------------------------------------------------------------
# Rank correlations of the NTDH check (synthetic sweeps): Spearman's ρ pooled over all runs, within each setting (γ),
# and the γ-controlled partial correlation, each with a percentile bootstrap 95 % interval (scipy.stats).

def spearman(x, y) -> tuple[float, float]:
    """Spearman's rank correlation ρ and its two-sided p-value (scipy.stats.spearmanr); NaN for constant input or
    n < 3."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.size != y.size:
        raise ValueError(f"spearman: x has {x.size} values, y has {y.size}")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    rho, p = spearmanr(x, y)
    return float(rho), float(p)


def _pearson(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    a = a - a.mean(axis, keepdims=True)
    b = b - b.mean(axis, keepdims=True)
    den = np.sqrt((a * a).sum(axis) * (b * b).sum(axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(axis) / np.where(den > 0, den, 1.0), np.nan)


def _rank_corr(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman ρ along `axis` (vectorised over bootstrap resamples): Pearson of scipy.stats.rankdata ranks."""
    from scipy.stats import rankdata

    return _pearson(rankdata(x, axis=axis), rankdata(y, axis=axis), axis)


def _partial_rank_corr(x: np.ndarray, y: np.ndarray, g: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman ρ of x and y controlling for the categorical setting g: ranks over all pairs, each rank's mean over
    its setting subtracted (the residual of a regression on one indicator per setting), Pearson of the residuals."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=axis), rankdata(y, axis=axis)
    for v in np.unique(g):
        m = (g == v).astype(float)
        n = np.maximum(m.sum(axis, keepdims=True), 1.0)
        rx = rx - m * (rx * m).sum(axis, keepdims=True) / n
        ry = ry - m * (ry * m).sum(axis, keepdims=True) / n
    return _pearson(rx, ry, axis)


def _interval(data: tuple, statistic, n_resamples: int, seed: int) -> list[float] | None:
    """Percentile bootstrap 95 % interval (scipy.stats.bootstrap, paired resampling, seeded); resamples without a
    defined value (constant ranks) are left out; None when fewer than half are defined."""
    import warnings

    from scipy.stats import bootstrap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        boot = bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                         confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed))
    dist = np.asarray(boot.bootstrap_distribution)
    ok = np.isfinite(dist)
    if ok.mean() < 0.5:
        return None
    return [float(v) for v in np.percentile(dist[ok], [2.5, 97.5])]


def spearman_summary(x: np.ndarray, y: np.ndarray, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """(settings, runs) arrays → the NTDH check of a synthetic sweep:
    rho, p, n: Spearman ρ over every run of every setting (pooled: the setting, γ, drives it);
    rho_means: ρ over the per-setting means (NaN with fewer than 3 settings);
    within: per setting {"rho", "ci"}, ρ over that setting's runs with a bootstrap 95 % interval;
    partial: {"rho", "ci"}, the γ-controlled partial rank correlation (ranks centred per setting) with its interval.
    An undefined ρ (constant input, fewer than 3 runs) is NaN with ci None."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rho, p = spearman(x, y)
    rho_means = spearman(x.mean(1), y.mean(1))[0] if x.shape[0] > 2 else float("nan")
    within = []
    for s in range(x.shape[0]):
        r = spearman(x[s], y[s])[0]
        ci = None if np.isnan(r) else _interval((x[s], y[s]), _rank_corr, n_resamples, seed + s)
        within.append({"rho": r, "ci": ci})
    g = np.repeat(np.arange(x.shape[0]), x.shape[1])
    part = float(_partial_rank_corr(x.ravel(), y.ravel(), g))
    part_ci = None if np.isnan(part) or x.shape[1] < 3 else \
        _interval((x.ravel(), y.ravel(), g), _partial_rank_corr, n_resamples, seed + x.shape[0])
    return {"rho": rho, "p": p, "n": int(x.size), "rho_means": rho_means, "within": within,
            "partial": {"rho": part, "ci": part_ci}}
