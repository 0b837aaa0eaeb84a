"""Synthetic two-modality Gaussian data (NTDH §1.1 / MFH §2), one independent data set per run.

Each run is drawn from ``numpy.random.RandomState(seed)`` in the reference's order, so run ``seed`` sees exactly the
numbers the reference's ``np.random.seed(seed)`` would give it; the runs are then stacked on a leading axis for the
vectorised trainer.

increase_gamma (NTDH, MFH Figure 2): a latent xs ~ N(0, I_{xs1+xs2}) decides y = 1[xs·a > 0]. The student modality
    x2 holds latent dims 0..xs2−1, the teacher modality x1 holds latent dims [xs2−ov, xs2+xs1−ov) at the same column
    indices; the other columns are N(0,1) noise. γ = |shared| / |union| = ov / (xs1 + xs2 − ov).
increase_alpha (MFH Figure 3): a latent xs ~ N(0, I_{x1_dim}) decides y = 1[xs·a[:x1_dim] > 0]. x2 holds latent dims
    0..xs2−1, x1 holds latent dims 0..xs1+xs2−1 (all of x2's plus xs1 exclusive ones), both at the same column
    indices. α = xs1 / (xs1 + xs2) (the teacher-exclusive share), γ = 1 − α.
modify_gamma (MFH Table 2): a latent xs ~ N(0, I_{xs1+xs2}) decides y = 1[xs·a > 0] with a = ones (reference) or
    a ~ N(0, I); x1 holds every latent dim at columns 0..xs1+xs2−1 and x2 the first xs2 of them at columns
    0..xs2−1, so x1's columns 0..xs2−1 are the shared (modality-general) decisive ones; γ = xs2 / (xs1 + xs2).
    Draw order xs, x1, x2; train, test and a fresh training set come from one RandomState(seed) stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Split:
    """One split of R runs, feature-major (the layout of common.synthetic.vectorized): x (R, dim, N), y (R, N)."""
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


def _decision(rng, decision: str, a_dim: int) -> np.ndarray:
    """The decision vector a: drawn from the run's stream (randn) or all ones (MFH modify_gamma, no draw)."""
    if decision == "randn":
        return rng.randn(a_dim)
    if decision == "ones":
        return np.ones(a_dim)
    raise ValueError(f"data.decision must be randn or ones, got {decision!r}")


def increase_gamma(seeds, overlaps, *, n_train=200, n_test=1000, x1_dim=25, x2_dim=25, xs1_dim=10,
                   xs2_dim=10, a_dim=500, decision="randn") -> tuple[Split, Split]:
    """(train, test) for every (overlap, seed), stacked overlap-major: group k·R + r is overlap k, seed r.

    Train comes from RandomState(seed) after a ~ N(0, I_a_dim), test from RandomState(seed + 1) with the same a
    (the reference's order), so each run sees the reference's numbers.
    """
    for ov in overlaps:
        if not 0 <= ov <= min(xs1_dim, xs2_dim):
            raise ValueError(f"overlap must lie in [0, {min(xs1_dim, xs2_dim)}], got {ov}")
        if x1_dim < xs1_dim + xs2_dim - ov or x2_dim < xs2_dim:
            raise ValueError("x1_dim/x2_dim too small for the decisive dimensions they must hold")
    if a_dim < xs1_dim + xs2_dim:
        raise ValueError(f"a_dim must be ≥ xs1_dim + xs2_dim = {xs1_dim + xs2_dim}, got {a_dim}")
    n_set, n_run = len(overlaps), len(seeds)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x1 = np.empty((n_set, n_run, x1_dim, n), np.float32)   # feature-major, written in place
        x2 = np.empty((n_set, n_run, x2_dim, n), np.float32)
        y = np.empty((n_set, n_run, n), np.int64)
        for r, seed in enumerate(seeds):
            rng = np.random.RandomState(seed)
            a = _decision(rng, decision, a_dim)
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


def increase_alpha(seeds, exclusive_dims, *, n_train=200, n_test=1000, x1_dim=50, x2_dim=50, xs2_dim=10,
                   a_dim=500, decision="randn") -> tuple[Split, Split]:
    """(train, test) for every (xs1, seed), stacked setting-major: group k·R + r is exclusive_dims[k], seed r.

    Seeding as increase_gamma (a, then train from RandomState(seed); test from RandomState(seed + 1)). One draw per
    run serves every xs1: the noise does not depend on it, only how many latent columns are copied into x1 does.
    """
    if a_dim < x1_dim:
        raise ValueError(f"a_dim must be ≥ x1_dim = {x1_dim} (the latent has x1_dim dims), got {a_dim}")
    if x2_dim < xs2_dim:
        raise ValueError(f"x2_dim must be ≥ xs2_dim = {xs2_dim}, got {x2_dim}")
    for xs1 in exclusive_dims:
        if not 0 <= xs1 <= x1_dim - xs2_dim:
            raise ValueError(f"exclusive dims must lie in [0, x1_dim − xs2_dim = {x1_dim - xs2_dim}], got {xs1}")
    n_set, n_run = len(exclusive_dims), len(seeds)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x1 = np.empty((n_set, n_run, x1_dim, n), np.float32)
        x2 = np.empty((n_set, n_run, x2_dim, n), np.float32)
        y = np.empty((n_set, n_run, n), np.int64)
        for r, seed in enumerate(seeds):
            rng = np.random.RandomState(seed)
            a = _decision(rng, decision, a_dim)
            if split == "test":
                rng = np.random.RandomState(seed + 1)
            xs = rng.randn(n, x1_dim)                        # the reference's order: xs, x2, x1
            y[:, r] = (xs @ a[:x1_dim] > 0).astype(np.int64)
            x2_r = rng.randn(n, x2_dim)
            x2_r[:, :xs2_dim] = xs[:, :xs2_dim]
            x2[:, r] = x2_r.T
            noise = rng.randn(n, x1_dim)
            for k, xs1 in enumerate(exclusive_dims):
                x1[k, r] = noise.T
                x1[k, r, :xs1 + xs2_dim] = xs[:, :xs1 + xs2_dim].T
        flat = lambda v: torch.from_numpy(v.reshape(n_set * n_run, *v.shape[2:]))
        out.append(Split(flat(x1), flat(x2), flat(y)))
    return out[0], out[1]


def alpha_of(exclusive: int, xs2_dim: int) -> float:
    return exclusive / (exclusive + xs2_dim)


def _draw_modify_gamma(rng, a, n, x1_dim, x2_dim, xs1_dim, xs2_dim):
    latent = xs1_dim + xs2_dim
    xs = rng.randn(n, latent)
    y = (xs @ a[:latent] > 0).astype(np.int64)
    x1 = rng.randn(n, x1_dim)
    x1[:, :latent] = xs
    x2 = rng.randn(n, x2_dim)
    x2[:, :xs2_dim] = xs[:, :xs2_dim]
    return x1, x2, y


def modify_gamma(seeds, xs2_dims, *, n_train=200, n_test=1000, x1_dim=50, x2_dim=50, xs1_dim=10, a_dim=500,
                 decision="ones") -> tuple[list[Split], list[Split], list[Split]]:
    """Per xs2 in `xs2_dims`: (train, test, fresh train) lists, one Split of R runs each (the settings have different
    numbers of shared columns, so they are not stacked here).

    Run `seed` draws, from one RandomState(seed) stream and in this order, a (decision randn only), the training
    set, the test set and a fresh training set (the reference's `use_unlabeled` redraw, used for the KD stage);
    each set in the order xs, x1, x2. The shared decisive columns are x1's and x2's columns 0..xs2−1.
    """
    for xs2 in xs2_dims:
        if xs2 < 1 or x1_dim < xs1_dim + xs2 or x2_dim < xs2 or a_dim < xs1_dim + xs2:
            raise ValueError(f"xs2_dim {xs2} does not fit: need 1 ≤ xs2, xs1_dim + xs2 ≤ x1_dim ({x1_dim}) and "
                             f"a_dim ({a_dim}), xs2 ≤ x2_dim ({x2_dim})")
    sets: tuple[list[Split], list[Split], list[Split]] = ([], [], [])
    for xs2 in xs2_dims:
        arrays = [[], [], []]
        for seed in seeds:
            rng = np.random.RandomState(seed)
            a = _decision(rng, decision, a_dim)
            for k, n in enumerate((n_train, n_test, n_train)):
                arrays[k].append(_draw_modify_gamma(rng, a, n, x1_dim, x2_dim, xs1_dim, xs2))
        for k, draws in enumerate(arrays):
            x1 = torch.from_numpy(np.stack([d[0].T for d in draws]).astype(np.float32))
            x2 = torch.from_numpy(np.stack([d[1].T for d in draws]).astype(np.float32))
            sets[k].append(Split(x1, x2, torch.from_numpy(np.stack([d[2] for d in draws]))))
    return sets


def concat(splits: list[Split]) -> Split:
    """Stack several settings (e.g. every γ) along the runs axis so they train as one computation."""
    return Split(*(torch.cat([getattr(s, k) for s in splits]) for k in ("x1", "x2", "y")))
