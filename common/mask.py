"""NTDH per-sample (or per-pixel) distillation weight ω, the "PSSM" mask of the reference (NTDH's
sklearn/utils/functions.py, pd_diff; NTDH, arXiv 2409.02438).

    ω_i = 1                                   if the teacher is right on sample i,
    ω_i = 1[cos_i ≥ τ] · (cos_i + 1) / 2      if the teacher is wrong,
with cos_i the cosine similarity between the teacher's and the student's score vectors over the class axis and
τ = 0.996. A wrong teacher whose scores are not almost collinear with the student's is dropped from distillation.
"""
from __future__ import annotations

import torch

SPACES = ("logits", "probs")


def teacher_wrong(teacher_scores: torch.Tensor, labels: torch.Tensor, class_dim: int = 1) -> torch.Tensor:
    """Boolean mask of the samples (pixels) where the teacher's arg-max is not the label.

    Written as "the label's score is below the maximum" (ties count as right): on CPU, argmax over a small
    non-last class axis is ~20× slower than a max reduction plus a gather.
    """
    target = teacher_scores.gather(class_dim, labels.long().unsqueeze(class_dim)).squeeze(class_dim)
    return target < teacher_scores.amax(class_dim)


def omega(teacher_scores: torch.Tensor, labels: torch.Tensor, student_scores: torch.Tensor, *,
          threshold: float = 0.996, space: str = "logits", class_dim: int = 1, detach: bool = True) -> torch.Tensor:
    """NTDH weight ω with the class axis at `class_dim`: (B,C) → (B,), (B,C,H,W) → (B,H,W), (R,B,C) with class_dim=-1.

    space: the cosine is taken between the raw scores ("logits", gauss/sklearn) or between their softmax ("probs",
        the reference's SemanticKITTI). Both inputs are logits in either case.
    detach: ω is a weight, not a loss term, so by default no gradient flows through it. The reference does not
        detach (gradients reach the student through the cosine of teacher-wrong samples); `detach=False` keeps that
        for parity.
    """
    if space not in SPACES:
        raise ValueError(f"omega space must be one of {SPACES}, got {space!r}")
    t, s = teacher_scores, student_scores
    if space == "probs":
        t, s = t.softmax(class_dim), s.softmax(class_dim)
    # cosine as in F.cosine_similarity (eps 1e-8), written out: much faster for a small class axis on CPU
    norms = (t.pow(2).sum(class_dim) * s.pow(2).sum(class_dim)).clamp_min(1e-16).sqrt()
    cos = (t * s).sum(class_dim) / norms
    wrong = teacher_wrong(teacher_scores, labels, class_dim)
    kept_if_wrong = (cos >= threshold).to(cos.dtype) * (cos + 1) / 2
    w = torch.where(wrong, kept_if_wrong, torch.ones_like(cos))
    return w.detach() if detach else w
