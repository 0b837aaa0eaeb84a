"""Segmentation losses of PMF (the reference repository's semanticKITTI/pc_processor/loss): class-weighted focal
softmax, Lovász-softmax, perception-aware loss, and the two trainers' focal + λ·Lovász objective."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FocalSoftmaxLoss(nn.Module):
    """ℓ = −α_y (1 − p_y)^γ log max(p_y, 1e−6), averaged over the pixels where `mask` is set.

    Takes logits (B, C, H, W); log p_y comes from log_softmax (stable), clamped at log 1e−6 like the reference.
    """

    def __init__(self, alpha: torch.Tensor, gamma: float = 2.0):
        super().__init__()
        self.register_buffer("alpha", alpha.float())
        self.gamma = gamma

    def forward(self, logits, labels, mask):
        logp = F.log_softmax(logits.float(), 1).gather(1, labels.unsqueeze(1)).squeeze(1)
        logp = logp.clamp_min(math.log(1e-6))
        loss = -self.alpha[labels] * (1 - logp.exp()).pow(self.gamma) * logp
        m = mask.to(loss.dtype)
        return (loss * m).sum() / m.sum().clamp_min(1)


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss w.r.t. sorted errors (Berman et al. 2018)."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if gt_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax(probs: torch.Tensor, labels: torch.Tensor, ignore: int | None = 0,
                   classes: str = "present") -> torch.Tensor:
    """Lovász-softmax on probabilities (B, C, H, W) (or (N, C)): pixels flattened, `ignore` pixels removed, mean over
    the classes present in the labels ("present") or all classes ("all"); 0 for an empty input."""
    C = probs.shape[1]
    p = probs.movedim(1, -1).reshape(-1, C) if probs.dim() > 2 else probs
    y = labels.reshape(-1)
    if ignore is not None:
        keep = y != ignore
        p, y = p[keep], y[keep]
    if y.numel() == 0:
        return probs.sum() * 0.0
    losses = []
    for c in range(C):
        fg = (y == c).to(p.dtype)
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - p[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[perm])))
    if not losses:
        return probs.sum() * 0.0
    return torch.stack(losses).mean()


class LovaszSoftmax(nn.Module):
    def __init__(self, ignore: int | None = 0):
        super().__init__()
        self.ignore = ignore

    def forward(self, probs, labels):
        return lovasz_softmax(probs.float(), labels, self.ignore)


def perception_aware_loss(pcd_logits, img_logits, label_mask, tau: float = 0.7):
    """PMF's perception-aware loss (the reference's trainer.py, `_computePerceptionAwareLoss`), averaged over the
    labelled pixels: each stream learns from the other where the other is more confident (normalised entropy),
    above τ.

        conf = 1 − H(p)/log C;  imp = conf_pcd − conf_img
        w_img = 1[imp > 0]·|imp|·1[conf_pcd ≥ τ]  (image learns from LiDAR), w_pcd symmetric
        loss = mean(KL(pcd‖img)·w_img) + mean(KL(img‖pcd)·w_pcd)   (teacher side detached)
    """
    C = pcd_logits.shape[1]
    lp_pcd, lp_img = F.log_softmax(pcd_logits.float(), 1), F.log_softmax(img_logits.float(), 1)
    ent = lambda lp: -(lp.exp() * lp).sum(1)  # noqa: E731
    conf_pcd = 1 - ent(lp_pcd) / math.log(C)
    conf_img = 1 - ent(lp_img) / math.log(C)
    imp = (conf_pcd - conf_img).detach()
    w_img = (imp > 0).float() * imp.abs() * (conf_pcd.detach() >= tau).float()
    w_pcd = (imp < 0).float() * imp.abs() * (conf_img.detach() >= tau).float()
    kl_img = (lp_pcd.detach().exp() * (lp_pcd.detach() - lp_img)).sum(1)   # image follows LiDAR
    kl_pcd = (lp_img.detach().exp() * (lp_img.detach() - lp_pcd)).sum(1)   # LiDAR follows image
    m = label_mask.float()
    n = m.sum().clamp_min(1)
    return (kl_img * w_img * m).sum() / n + (kl_pcd * w_pcd * m).sum() / n


class SegmentationLoss(nn.Module):
    """focal(logits, y, label > 0) + λ·Lovász(softmax(logits), y), the reference's segmentation objective of both
    trainers (semanticKITTI/trainer.py and trainer_student.py); returns (total, focal, lovasz)."""

    def __init__(self, alpha: torch.Tensor, gamma: float, lam: float):
        super().__init__()
        self.focal = FocalSoftmaxLoss(alpha, gamma)
        self.lovasz = LovaszSoftmax(ignore=0)
        self.lam = lam

    def forward(self, logits, label):
        logits = logits.float()
        f = self.focal(logits, label, label > 0)
        lv = self.lovasz(logits.softmax(1), label)
        return f + self.lam * lv, f, lv
