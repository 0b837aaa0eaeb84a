"""Feature distillation terms: ``mse``, ``cosine`` and ``fitnet`` (a trainable regressor, then MSE).

Rows are samples for (B, D) inputs and positions for dense (B, C, *spatial) inputs (C is then the feature axis).
ω weights rows: (1/N) Σ_i ω_i ℓ_i, so ω = 1 is the unweighted loss and ω_i = 0 removes row i. Internally (G, D, N).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.kd.base import DistillLoss, register
from common.kd.layers import BatchedLinear


@register("mse")
class MSEDistill(DistillLoss):
    """Mean squared difference per row (averaged over features), ω-weighted mean over rows."""

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t = self._rows(student_out, "student_out"), self._rows(teacher_out, "teacher_out")
        if s.shape != t.shape:
            raise ValueError(f"mse: student {tuple(s.shape)} and teacher {tuple(t.shape)} rows differ; use fitnet")
        return self.reduce_rows((s - t).pow(2).mean(1), self._per_row(omega, (s.shape[0], s.shape[2]), "omega"))


@register("cosine")
class CosineDistill(DistillLoss):
    """1 − cosine similarity.

    scope "sample": mean over rows of 1 − cos(s_i, t_i), ω-weighted.
    scope "global": 1 − cos(vec(S), vec(T)) over the whole batch flattened into one vector (M2PKD's privileged KD
        term). ω_i then weights sample i's share of the dot product and of both norms:
        cos = Σ ω_i⟨s_i,t_i⟩ / sqrt(Σ ω_i‖s_i‖² · Σ ω_i‖t_i‖²), so ω = 1 is the plain global cosine and ω_i = 0
        removes the sample.
    """

    def __init__(self, scope: str = "sample", eps: float = 1e-8, runs: int | None = None):
        super().__init__(runs)
        if scope not in ("sample", "global"):
            raise ValueError(f"cosine scope must be 'sample' or 'global', got {scope!r}")
        self.scope, self.eps = scope, eps

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t = self._rows(student_out, "student_out"), self._rows(teacher_out, "teacher_out")
        rows = (s.shape[0], s.shape[2])
        w = self._per_row(omega, rows, "omega")
        if self.scope == "sample":
            return self.reduce_rows(1 - F.cosine_similarity(s, t, dim=1, eps=self.eps), w)
        w = torch.ones(rows, dtype=s.dtype, device=s.device) if w is None else w.to(s.dtype)
        # one cosine per run (runs=R) or one over the whole batch
        sum_dims = (1,) if self.runs is not None else (0, 1)
        dot = (w * (s * t).sum(1)).sum(sum_dims)
        norm = ((w * s.pow(2).sum(1)).sum(sum_dims) * (w * t.pow(2).sum(1)).sum(sum_dims)).clamp_min(self.eps ** 2)
        return (1 - dot / norm.sqrt()).sum()


class _RowBatchNorm(nn.Module):
    """Batch normalisation of (G, D, N) rows with batch statistics and a trainable affine: statistics per run with
    runs, over all rows (every group) without."""

    def __init__(self, dim: int, runs: int | None, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(runs or 1, dim, 1))
        self.bias = nn.Parameter(torch.zeros(runs or 1, dim, 1))
        self.dims, self.eps = ((2,) if runs is not None else (0, 2)), eps

    def forward(self, x):
        mean, var = x.mean(self.dims, keepdim=True), x.var(self.dims, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


@register("fitnet")
class FitNetDistill(DistillLoss):
    """FitNet hint: MSE(regressor(s), t) with a regressor trained together with the student.

    regressor "linear": a linear map student_dim → teacher_dim (a 1×1 convolution on dense features).
    regressor "bn_relu": ReLU(BatchNorm(s)) with a trainable affine — the reference's ConvReg, which it re-created
        (untrained) at every step; here it is built once and optimised. Needs student_dim == teacher_dim.
    regressor "linear_bn_relu": both.
    trainable: False keeps the regressor at its initial state (no gradient, not optimised). With "bn_relu" that is
        exactly the reference's behaviour (NTDH gauss/main.py, `train_kd`, mode `hint`: a new ConvReg — BatchNorm1d in
        train mode, weight 1, bias 0, then ReLU — built at every step and never trained); the parity path.
    """

    def __init__(self, student_dim: int, teacher_dim: int, regressor: str = "linear", runs: int | None = None,
                 trainable: bool = True):
        super().__init__(runs)
        if not trainable and regressor != "bn_relu":
            raise ValueError(f"fitnet trainable: false needs regressor 'bn_relu' (an untrained BatchNorm + ReLU is the "
                             f"same every step; a fresh random linear map is not), got {regressor!r}")
        if regressor not in ("linear", "bn_relu", "linear_bn_relu"):
            raise ValueError(f"fitnet regressor must be 'linear', 'bn_relu' or 'linear_bn_relu', got {regressor!r}")
        if regressor == "bn_relu" and student_dim != teacher_dim:
            raise ValueError(f"fitnet regressor 'bn_relu' needs student_dim == teacher_dim, got "
                             f"{student_dim} and {teacher_dim}")
        layers: list[nn.Module] = []
        if regressor.startswith("linear"):
            layers.append(BatchedLinear(student_dim, teacher_dim, runs=runs))
        if regressor.endswith("bn_relu"):
            layers += [_RowBatchNorm(teacher_dim, runs), nn.ReLU()]
        self.regressor = nn.Sequential(*layers)
        self.regressor.requires_grad_(trainable)

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t = self._rows(student_out, "student_out"), self._rows(teacher_out, "teacher_out")
        s = self.regressor(s)
        if s.shape != t.shape:
            raise ValueError(f"fitnet: regressed student {tuple(s.shape)} does not match teacher {tuple(t.shape)}")
        return self.reduce_rows((s - t).pow(2).mean(1), self._per_row(omega, (s.shape[0], s.shape[2]), "omega"))
