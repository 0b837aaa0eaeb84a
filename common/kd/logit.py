"""Logit distillation terms: vanilla KD (``kl``), decoupled KD (``dkd``) and target / non-target JS (``js``).

All three work per sample on (B, C) logits or per position on dense logits (B, C, *spatial) with ω of shape
(B, *spatial); every position is one row, and "batchmean" divides by the number of rows. Internally (G, C, N).
"""
from __future__ import annotations

import torch

from common import divergence as D
from common.kd.base import DistillLoss, register


def _need_labels(loss: DistillLoss, labels):
    if labels is None:
        raise ValueError(f"{loss.name}: this loss needs the labels")


@register("kl")
class KLDistill(DistillLoss):
    """Vanilla KD: (1/N) Σ_i KL(softmax(z_t,i/T) ‖ softmax(z_s,i/T)) [× T²].

    reduction: "batchmean" divides the sum by the number of rows N (NTDH everywhere); "mean" by N·C (MFH's
        ``KLDivLoss(reduction='mean')``, which silently shrinks KD by the class count).
    t2: multiply by T² (Hinton et al.); neither reference applies it.
    omega_mode: how ω enters. "scale" (default, the reference's KL_PSSM) multiplies both logit vectors of sample i by
        ω_i before the softmax, so ω_i = 0 turns both into the uniform distribution and the sample contributes 0;
        "weight" multiplies sample i's KL by ω_i.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean", t2: bool = False,
                 omega_mode: str = "scale", runs: int | None = None):
        super().__init__(runs)
        if reduction not in ("batchmean", "mean"):
            raise ValueError(f"kl reduction must be 'batchmean' or 'mean', got {reduction!r}")
        if omega_mode not in ("scale", "weight"):
            raise ValueError(f"kl omega_mode must be 'scale' or 'weight', got {omega_mode!r}")
        self.temperature, self.reduction, self.t2, self.omega_mode = float(temperature), reduction, t2, omega_mode

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        zs, zt = self._rows(student_out, "student_out"), self._rows(teacher_out, "teacher_out")
        rows = (zs.shape[0], zs.shape[2])
        w = self._per_row(omega, rows, "omega")
        if w is not None and self.omega_mode == "scale":
            scale = w.to(zs.dtype).unsqueeze(1)
            zs, zt, w = zs * scale, zt * scale, None
        per_row = D.kl_logits(zt, zs, self.temperature, dim=1)
        if self.reduction == "mean":
            per_row = per_row / zs.shape[1]
        if self.t2:
            per_row = per_row * self.temperature ** 2
        return self.reduce_rows(per_row, w)


@register("dkd")
class DKDistill(DistillLoss):
    """Decoupled KD (Zhao et al. 2022): α·TCKD + β·NCKD, both × T², with per-sample ω on both parts (DKD_PSSM).

    TCKD_i = KL(b_t,i ‖ b_s,i) over the binary [target, non-target] masses; NCKD_i = KL(p̂_t,i ‖ p̂_s,i) over the
    non-target classes renormalised (the target is masked out exactly, not by subtracting 1000).

    With two classes the binary masses are the class distribution itself (up to the order of the classes) and the
    non-target distribution is a point mass, so TCKD_i = KL(p_t,i ‖ p_s,i) and NCKD_i = 0 exactly: that case is
    computed as one plain KL (`_class_kl`), a fraction of the work of the split (the synthetic experiments are
    binary; their engine, common.synthetic.fused, forms that KL's gradient in closed form).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, runs: int | None = None):
        super().__init__(runs)
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        _need_labels(self, labels)
        zs, zt = self._rows(student_out, "student_out"), self._rows(teacher_out, "teacher_out")
        rows = (zs.shape[0], zs.shape[2])
        y, w = self._per_row(labels, rows, "labels"), self._per_row(omega, rows, "omega")
        T = self.temperature
        if zs.shape[1] == 2:
            return self.reduce_rows(self._class_kl(zt, zs, T) * (self.alpha * T ** 2), w)
        bin_s, nt_s, support = D.split_log_probs(zs, y, T, 1)
        bin_t, nt_t, _ = D.split_log_probs(zt, y, T, 1)
        tckd = D.kl_from_log(bin_t, bin_s, 1)
        nckd = D.kl_from_log(nt_t, nt_s, 1, support)
        per_row = (self.alpha * tckd + self.beta * nckd) * T ** 2
        return self.reduce_rows(per_row, w)

    @staticmethod
    def _class_kl(z_t, z_s, temperature: float):
        """Per-row KL(softmax(z_t/T) ‖ softmax(z_s/T)) over the class axis 1 (the two-class case)."""
        return D.kl_logits(z_t, z_s, temperature, dim=1)


@register("js")
class JSDistill(DistillLoss):
    """Jensen–Shannon between student and teacher on the target part, the non-target part, or their sum.

    part: "nontarget" (NTDH's ncjsd, the Algorithm-1 training distance), "target", or "both".
    variant: "textbook" ½[KL(P‖M)+KL(Q‖M)] or "reference" ½[KL(M‖P)+KL(M‖Q)] (what the NTDH code computes).
    temperature divides the logits (the reference uses T = 1).
    """

    def __init__(self, part: str = "nontarget", variant: str = "textbook", temperature: float = 1.0,
                 runs: int | None = None):
        super().__init__(runs)
        if part not in ("nontarget", "target", "both"):
            raise ValueError(f"js part must be 'nontarget', 'target' or 'both', got {part!r}")
        if variant not in D.JS_VARIANTS:
            raise ValueError(f"js variant must be one of {D.JS_VARIANTS}, got {variant!r}")
        self.part, self.variant, self.temperature = part, variant, float(temperature)

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        _need_labels(self, labels)
        zs, zt = self._rows(student_out, "student_out"), self._rows(teacher_out, "teacher_out")
        rows = (zs.shape[0], zs.shape[2])
        y, w = self._per_row(labels, rows, "labels"), self._per_row(omega, rows, "omega")
        per_row = torch.zeros(rows, dtype=zs.dtype, device=zs.device)
        if self.part in ("nontarget", "both"):
            per_row = per_row + D.nontarget_js(zs, zt, y, self.variant, self.temperature, dim=1)
        if self.part in ("target", "both"):
            per_row = per_row + D.target_js(zs, zt, y, self.variant, self.temperature, dim=1)
        return self.reduce_rows(per_row, w)
