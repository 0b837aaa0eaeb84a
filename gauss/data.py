"""Synthetic two-modality Gaussian data (NTDH §1.1 / MFH §2), one independent data set per run.

Each run is drawn from ``numpy.random.RandomState(seed)`` in the reference's order, so run ``seed`` sees exactly the
numbers the reference's ``np.random.seed(seed)`` would give it; the runs are then stacked on a leading axis for the
vectorised trainer.

increase_gamma: a latent xs ~ N(0, I_{xs1+xs2}) decides y = 1[xs·a > 0]. The student modality x2 holds latent dims
    0..xs2−1, the teacher modality x1 holds latent dims [xs2−ov, xs2+xs1−ov) at the same column indices; the other
    columns are N(0,1) noise. γ = |shared| / |union| = ov / (xs1 + xs2 − ov).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Split:
    """One split of R runs, feature-major (the layout of common.vectorized): x (R, dim, N), y (R, N)."""
    x1: torch.Tensor  # (R, x1_dim, N) teacher modality
    x2: torch.Tensor  # (R, x2_dim, N) student modality
    y: torch.Tensor   # (R, N) labels

    def to(self, device):
        return Split(self.x1.to(device), self.x2.to(device), self.y.to(device))


def gamma_of(overlap: int, xs1_dim: int, xs2_dim: int) -> float:
    return overlap / (xs1_dim + xs2_dim - overlap)


def _draw_increase_gamma(rng, a, n, x1_dim, x2_dim, xs1_dim, xs2_dim):
    """One draw in the reference's order (xs, then x2, then x1's noise). The noise does not depend on the
    overlap, only which latent columns are copied into x1 does, so one draw serves every γ."""
    latent = xs1_dim + xs2_dim
    xs = rng.randn(n, latent)
    y = (xs @ a[:latent] > 0).astype(np.int64)
    x2 = rng.randn(n, x2_dim)
    x2[:, :xs2_dim] = xs[:, :xs2_dim]
    return xs, x2, rng.randn(n, x1_dim), y


def increase_gamma(seeds, overlaps, *, n_train=200, n_test=1000, x1_dim=25, x2_dim=25, xs1_dim=10,
                   xs2_dim=10, a_dim=500) -> tuple[Split, Split]:
    """(train, test) for every (overlap, seed), stacked overlap-major: group k·R + r is overlap k, seed r.

    Train comes from RandomState(seed) after a ~ N(0, I_a_dim), test from RandomState(seed + 1) with the same a
    (the reference's order), so each run sees the reference's numbers.
    """
    for ov in overlaps:
        if not 0 <= ov <= min(xs1_dim, xs2_dim):
            raise ValueError(f"overlap must lie in [0, {min(xs1_dim, xs2_dim)}], got {ov}")
        if x1_dim < xs1_dim + xs2_dim - ov or x2_dim < xs2_dim:
            raise ValueError("x1_dim/x2_dim too small for the decisive dimensions they must hold")
    n_set, n_run = len(overlaps), len(seeds)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x1 = np.empty((n_set, n_run, x1_dim, n), np.float32)   # feature-major, written in place
        x2 = np.empty((n_set, n_run, x2_dim, n), np.float32)
        y = np.empty((n_set, n_run, n), np.int64)
        for r, seed in enumerate(seeds):
            rng = np.random.RandomState(seed)
            a = rng.randn(a_dim)
            if split == "test":  # train continues the stream right after a; test restarts from seed + 1
                rng = np.random.RandomState(seed + 1)
            xs, x2_r, noise, y_r = _draw_increase_gamma(rng, a, n, x1_dim, x2_dim, xs1_dim, xs2_dim)
            x2[:, r], y[:, r] = x2_r.T, y_r
            for k, ov in enumerate(overlaps):
                lo = xs2_dim - ov
                x1[k, r] = noise.T
                x1[k, r, lo:lo + xs1_dim] = xs[:, lo:lo + xs1_dim].T
        flat = lambda v: torch.from_numpy(v.reshape(n_set * n_run, *v.shape[2:]))
        out.append(Split(flat(x1), flat(x2), flat(y)))
    return out[0], out[1]


def concat(splits: list[Split]) -> Split:
    """Stack several settings (e.g. every γ) along the runs axis so they train as one computation."""
    return Split(*(torch.cat([getattr(s, k) for s in splits]) for k in ("x1", "x2", "y")))
