"""NTDH sklearn data (NTDH sklearn/dataloader/dataset.py): `make_classification` features split into two synthetic modalities.

One run draws, from its data seed s:
    X, y = make_classification(10000, n_features=50, n_informative=50, n_classes=4, 1 cluster per class, random_state=s)
    standardise (StandardScaler fitted on the training split; the reference fits it on all 10000 samples, a test
    leak kept behind `parity`), train_test_split(test 0.4, random_state=s) → 6000 train / 4000 test;
    then, from numpy.random.RandomState(s), in the reference's order: x2_train, x1_train, x2_test, x1_test ~ N(0, I_50)
    noise, with the student x2 holding the real columns 0..19 and the teacher x1 the real columns
    [20 − ov, 40 − ov) at the same indices.
So x1 and x2 share the ov real columns [20 − ov, 20); γ = ov / 20 is the fraction of x1's 20 decisive columns that
x2 also sees. The informative columns 40..49 are seen by neither modality (label noise for both).

The noise does not depend on ov, so one draw per run serves every γ, and x2 is the same for every γ.
The reference seeds the data with 42 for every run (NTDH sklearn/main.py, run_exp: only the model init varies); here run r uses
data seed `seed + r` unless `same_data_every_run` (parity).

Layout: feature-major (common.synthetic.vectorized), x (G, D, N), y (G, N), groups γ-major: group k·R + r is overlap k, run r.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler


@dataclass
class Split:
    x1: torch.Tensor  # (G, x_dim, N) teacher modality
    x2: torch.Tensor  # (G, x_dim, N) student modality
    y: torch.Tensor   # (G, N)

    def to(self, device):
        return Split(self.x1.to(device), self.x2.to(device), self.y.to(device))


@dataclass
class Layout:
    """Which columns are what (the ground truth Algorithm 1 is scored against)."""
    x_dim: int = 50
    fixed_dim: int = 20      # real columns per modality

    def check(self, overlap: int) -> None:
        if not 0 <= overlap <= self.fixed_dim:
            raise ValueError(f"overlap must lie in [0, {self.fixed_dim}], got {overlap}")
        if 2 * self.fixed_dim > self.x_dim:
            raise ValueError(f"x_dim={self.x_dim} cannot hold two blocks of {self.fixed_dim} real columns")

    def x1_decisive(self, overlap: int) -> list[int]:
        return list(range(self.fixed_dim - overlap, 2 * self.fixed_dim - overlap))

    def x2_decisive(self, overlap: int = 0) -> list[int]:
        return list(range(self.fixed_dim))

    def shared(self, overlap: int) -> list[int]:
        """Columns both modalities hold (the modality-general decisive information)."""
        return list(range(self.fixed_dim - overlap, self.fixed_dim))


def gamma_of(overlap: int, fixed_dim: int = 20) -> float:
    return overlap / fixed_dim


def features(seed: int, *, n_samples=10000, n_features=50, n_classes=4, n_clusters_per_class=1, test_size=0.4,
             scaler_fit="train"):
    """(X_train, y_train, X_test, y_test) of one run, standardised; scaler_fit "train" (fixed) or "all" (reference)."""
    if scaler_fit not in ("train", "all"):
        raise ValueError(f"scaler_fit must be 'train' or 'all', got {scaler_fit!r}")
    X, y = make_classification(n_samples=n_samples, n_features=n_features, n_informative=n_features,
                               n_redundant=0, n_repeated=0, n_classes=n_classes,
                               n_clusters_per_class=n_clusters_per_class, random_state=seed)
    if scaler_fit == "all":
        X = StandardScaler().fit_transform(X)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_size, random_state=seed)
    if scaler_fit == "train":
        scaler = StandardScaler().fit(X_tr)
        X_tr, X_te = scaler.transform(X_tr), scaler.transform(X_te)
    return X_tr, y_tr, X_te, y_te


def one_run(seed: int, overlaps, layout: Layout, **kw):
    """Per split (train, test): x1 (K, D, N) for each overlap, x2 (D, N), y (N,) — numpy, float32 / int64."""
    for ov in overlaps:
        layout.check(ov)
    if kw.get("n_features", 50) < 2 * layout.fixed_dim or layout.x_dim < 2 * layout.fixed_dim:
        raise ValueError("n_features and x_dim must both hold the 2·fixed_dim real columns")
    X_tr, y_tr, X_te, y_te = features(seed, **kw)
    rng = np.random.RandomState(seed)
    f = layout.fixed_dim
    noise = {}
    for split, n in (("train", len(y_tr)), ("test", len(y_te))):  # the reference's order: x2, then x1, per split
        noise[split] = (rng.randn(n, layout.x_dim), rng.randn(n, layout.x_dim))
    out = {}
    for split, X, y in (("train", X_tr, y_tr), ("test", X_te, y_te)):
        x2, noise1 = noise[split]
        x2 = x2.copy()
        x2[:, :f] = X[:, :f]
        x1 = np.repeat(noise1.T[None].astype(np.float32), len(overlaps), 0)   # (K, D, N)
        for k, ov in enumerate(overlaps):
            x1[k, f - ov:2 * f - ov] = X[:, f - ov:2 * f - ov].T
        out[split] = (x1, x2.T.astype(np.float32), y.astype(np.int64))
    return out


def build(seeds, overlaps, layout: Layout | None = None, **kw) -> tuple[Split, Split]:
    """(train, test) for every (overlap, run), γ-major: group k·R + r is overlaps[k], seeds[r]."""
    layout = layout or Layout()
    runs = [one_run(s, overlaps, layout, **kw) for s in seeds]
    out = []
    for split in ("train", "test"):
        x1 = np.stack([r[split][0] for r in runs], 1)            # (K, R, D, N)
        x2 = np.stack([r[split][1] for r in runs])               # (R, D, N)
        y = np.stack([r[split][2] for r in runs])                # (R, N)
        k = len(overlaps)
        x1 = torch.from_numpy(x1.reshape(k * len(seeds), *x1.shape[2:]))
        x2 = torch.from_numpy(x2).repeat(k, 1, 1)
        y = torch.from_numpy(y).repeat(k, 1)
        out.append(Split(x1, x2, y))
    return out[0], out[1]
