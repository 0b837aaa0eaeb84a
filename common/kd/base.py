"""The one distillation contract every term follows, and the registry that builds terms by name.

A term is an ``nn.Module`` called as ``term(student_out, teacher_out, labels=None, omega=None, index=None)`` that
returns a scalar. ``omega`` is the NTDH weight from ``common.mask`` (per sample, or per pixel for dense outputs);
``index`` holds dataset indices (only CRD uses them). Terms with trainable parameters (FitNet regressor, CRD
embeddings) expose them through ``parameters()``; the trainer hands those to the student's optimiser.

Layout. Inputs follow PyTorch's (batch, channel, ...) convention: logits (B, C) or dense (B, C, *spatial), with
ω / labels of shape (B,) or (B, *spatial). Internally every term works on a group axis G, a class/feature axis and a
rows axis, i.e. (G, C, N): class-major, because on CPU a small class axis laid out last makes softmax and reductions
several times slower.

Runs axis. Every term can be built with ``runs=R``: its inputs are then (R, C, N) — R independent runs of N samples,
the (N, C, L) layout of PyTorch's 1-d ops — with labels / ω of shape (R, N); its parameters get one independent
copy per run; and the returned scalar is the **sum** of the R per-run losses, so each run's parameters receive
exactly the gradient of their own loss. This is how the synthetic experiments train 100 seeds as one batched
computation (``common.synthetic.vectorized``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, type["DistillLoss"]] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls):
        if name in _REGISTRY:
            raise KeyError(f"KD loss {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def available_losses() -> list[str]:
    return sorted(_REGISTRY)


def loss_class(name: str) -> type["DistillLoss"]:
    if name not in _REGISTRY:
        raise KeyError(f"unknown KD loss {name!r}; available: {', '.join(available_losses())}")
    return _REGISTRY[name]


def build_loss(name: str, **kwargs) -> "DistillLoss":
    """Build a registered term: ``build_loss("dkd", alpha=1, beta=8, temperature=4)``."""
    cls = loss_class(name)
    try:
        return cls(**kwargs)
    except TypeError as err:  # name the loss and the bad argument in one line
        raise TypeError(f"KD loss {name!r}: {err}") from None


class DistillLoss(nn.Module):
    """Base class: group-axis bookkeeping and ω-weighted reduction shared by all terms."""

    name = "base"
    #: True for terms computed independently per sample (logit and feature terms): these accept dense outputs
    #: (B, C, *spatial) with a per-position ω. Relational terms couple the samples of a batch.
    per_sample = True

    def __init__(self, runs: int | None = None):
        super().__init__()
        if runs is not None and runs < 1:
            raise ValueError(f"runs must be a positive integer or None, got {runs}")
        self.runs = runs

    @property
    def groups(self) -> int:
        return self.runs or 1

    # -- shape handling ---------------------------------------------------------------------------------------
    def _rows(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """→ (G, C, N): (R, C, N) with runs; (B, C) → (1, C, B); dense (B, C, *S) → (B, C, S) without."""
        if self.runs is not None:
            if x.dim() != 3 or x.shape[0] != self.runs:
                raise ValueError(f"{self.name}: {name} must have shape (runs={self.runs}, C, N), got {tuple(x.shape)}")
            return x
        if x.dim() < 2:
            raise ValueError(f"{self.name}: {name} must have shape (B, C, ...), got {tuple(x.shape)}")
        return x.t().unsqueeze(0) if x.dim() == 2 else x.flatten(2)

    def _samples(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """→ (G, N, D) for relational terms, which compare whole samples: (R, D, N) with runs, (B, ...) without."""
        if self.runs is not None:
            return self._rows(x, name).transpose(1, 2).contiguous()
        if x.dim() < 2:
            raise ValueError(f"{self.name}: {name} must have shape (B, D, ...), got {tuple(x.shape)}")
        return x.flatten(1).unsqueeze(0)

    def _per_row(self, v: torch.Tensor | None, shape, name: str) -> torch.Tensor | None:
        """Labels / ω → the (G, N) row shape of the matching _rows / _samples output."""
        if v is None:
            return None
        shape = tuple(shape)
        if v.numel() != shape[0] * shape[1]:
            raise ValueError(f"{self.name}: {name} has {v.numel()} entries, expected {shape[0] * shape[1]}")
        return v.reshape(shape)

    @staticmethod
    def subsample_rows(m: int | None, *tensors):
        """Keep the same m random rows (axis 1) of every (G, N, ...) tensor, independently per group; None passes.

        Used by relational terms on full-batch data: the loss is then estimated on a random minibatch of m samples
        per step, as these losses are normally used, instead of on all N² pairs.
        """
        ref = next(t for t in tensors if t is not None)
        g, n = ref.shape[:2]
        if m is None or m >= n:
            return tensors
        keep = torch.rand(g, n, device=ref.device).argsort(1)[:, :m]
        rows = torch.arange(g, device=ref.device).unsqueeze(1)
        return tuple(None if t is None else t[rows, keep] for t in tensors)

    def reduce_rows(self, per_row: torch.Tensor, omega: torch.Tensor | None) -> torch.Tensor:
        """(G, N) per-row losses → ω-weighted mean over rows (summed over runs with runs=R).

        ω_i = 0 removes a row's contribution; the normaliser stays the number of rows.
        """
        if omega is not None:
            per_row = per_row * omega.to(per_row.dtype)
        return per_row.mean(1).sum() if self.runs is not None else per_row.mean()

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):  # pragma: no cover
        raise NotImplementedError
