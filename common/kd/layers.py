"""The runs-aware linear layer: R independent ``nn.Linear`` layers with a leading runs axis, feature-major.

It lives with the KD terms because the terms' own parameters use it (the FitNet regressor, the CRD embeddings get one
independent copy per run with ``runs=R``); the synthetic experiments' models are stacks of it
(``common.synthetic.vectorized.batched_mlp``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def _seeds(runs: int | None, seeds: Sequence[int] | None) -> list[int | None]:
    g = runs or 1
    if seeds is None:
        return [None] * g
    seeds = list(seeds)
    if len(seeds) != g:
        raise ValueError(f"got {len(seeds)} seeds for {g} runs")
    return seeds


class BatchedLinear(nn.Module):
    """R independent ``nn.Linear(in, out)`` layers on feature-major input: (R, in, N) → (R, out, N).

    Without ``runs`` there is one weight, shared across the leading axis: (B, in, N) → (B, out, N) (a 1×1
    convolution). Initialisation matches ``nn.Linear`` (U(−1/√in, 1/√in) for weight and bias), drawn per run from
    ``seeds[r]`` when seeds are given.
    """

    def __init__(self, in_features: int, out_features: int, runs: int | None = None, bias: bool = True,
                 seeds: Sequence[int] | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.runs = in_features, out_features, runs
        g = runs or 1
        self.weight = nn.Parameter(torch.empty(g, out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(g, out_features, 1, device=device, dtype=dtype)) if bias else None
        self.reset_parameters(seeds)

    @torch.no_grad()
    def reset_parameters(self, seeds: Sequence[int] | None = None):
        bound = 1.0 / math.sqrt(self.in_features)
        for r, seed in enumerate(_seeds(self.runs, seeds)):
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            self.weight[r].copy_(torch.empty(self.out_features, self.in_features).uniform_(-bound, bound, generator=gen))
            if self.bias is not None:
                self.bias[r, :, 0].copy_(torch.empty(self.out_features).uniform_(-bound, bound, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs is None:
            out = torch.matmul(self.weight, x)
            return out + self.bias if self.bias is not None else out
        if x.dim() != 3 or x.shape[0] != self.runs or x.shape[1] != self.in_features:
            raise ValueError(f"BatchedLinear expects (runs={self.runs}, {self.in_features}, N), got {tuple(x.shape)}")
        if self.bias is None:
            return torch.bmm(self.weight, x)
        return torch.baddbmm(self.bias, self.weight, x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, runs={self.runs}"
