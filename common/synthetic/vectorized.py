"""Many small independent models trained as one batched computation (the synthetic suites: 100 seeds × 6 γ).

R independent models are held as stacked parameters with a leading runs axis and evaluated with batched matmuls
(``torch.baddbmm``). Tensors are laid out feature-major, (R, features, N) — PyTorch's (N, C, L) convention with the
runs as batch and the samples as length — because on CPU tiny feature axes laid out last make matmul, softmax and
reductions several times slower; the KD losses take (R, C, N) with ``runs=R`` for the same reason. Plain SGD /
momentum / Adam act elementwise, so one optimiser over the stacked tensors is exactly R independent optimisers. Losses are summed over runs (never averaged), so run r's parameters receive exactly the
gradient of run r's own loss: the vectorised result equals R separate trainings, up to float rounding.

Each run is initialised from its own seed, so run r gets the same initial weights whether it is trained alone or in
a batch of 600. `fit` here is the plain autograd trainer for any module; the synthetic experiments train with
`common.synthetic.fastfit` (the same updates, written out for BatchedLinear stacks).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.kd.layers import BatchedLinear

__all__ = ["BatchedLinear", "batched_mlp", "cross_entropy_sum", "accuracy", "fit"]


def batched_mlp(dims: Sequence[int], runs: int | None, seeds: Sequence[int] | None = None,
                activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Stack of BatchedLinear layers with an activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        layer_seeds = None if seeds is None else [s * 1000 + k for s in seeds]
        layers.append(BatchedLinear(i, o, runs, seeds=layer_seeds))
        if k < len(dims) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over runs of each run's mean cross-entropy; logits (R, C, N), labels (R, N)."""
    return F.cross_entropy(logits, labels, reduction="none").mean(-1).sum()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-run accuracy as a fraction: (R, C, N), (R, N) → (R,)."""
    return (logits.argmax(1) == labels).float().mean(-1)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, momentum: float = 0.0,
        objective=None, teacher_out: torch.Tensor | None = None, index: torch.Tensor | None = None,
        desc: str | None = None, progress: bool = False) -> nn.Module:
    """Full-batch SGD of R stacked models at once; x (R, D, N), y (R, N).

    Without ``objective`` the loss is the cross-entropy (summed over runs). With an ``objective``
    (``common.kd.Objective`` built with runs=R) the loss is its weighted sum of terms against ``teacher_out``, and
    the objective's own parameters (FitNet regressors, CRD embeddings) are optimised with the model's.

    Plain autograd + torch.optim.SGD for any module: the reference the fast trainer of BatchedLinear stacks,
    `common.synthetic.fastfit` (hand-written backward, closed-form logit gradients), is tested against.
    """
    epochs_bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    params = list(model.parameters()) + (list(objective.parameters()) if objective is not None else [])
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    model.train()
    for _ in epochs_bar:
        out = model(x)
        if objective is None:
            loss = cross_entropy_sum(out, y)
        else:
            loss, _ = objective(out, teacher_out, y, index=index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()
