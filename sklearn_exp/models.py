"""The reference's `TwoLayerNN` (NTDH sklearn/network/two_layer.py) for R independent runs at once.

`two_layer_nn(in, hidden, classes, runs, seeds)` is `common.synthetic.vectorized.batched_mlp([in, h, h, classes])`: Linear →
ReLU → Linear → ReLU → Linear, feature-major (R, D, N) → (R, C, N). The reference's unused `fc2_1` layer, its
ignored `beta` argument and its dropout (p = 0) are left out; its global-RNG reseeding is replaced by per-run seeds.
It is trained by `common.synthetic.fastfit.fit` (hand-written backward, closed-form logit gradients where they exist).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from common.synthetic.vectorized import batched_mlp


def two_layer_nn(in_dim: int, hidden: int, n_classes: int, runs: int, seeds: Sequence[int]) -> nn.Sequential:
    return batched_mlp([in_dim, hidden, hidden, n_classes], runs, seeds=seeds)
