"""Alg. 1 step 2 at place "input" for the batched MLPs of `models`, as a rank-1 update instead of a copy per column.

`input_saliency(teacher, student, x_t, x_s, y, ...)` returns what
`common.saliency.saliency_vector(teacher, student, [(x_t, x_s, y)], "input", op="permute", distance="ncjsd",
batch_dim=2, channel_dim=1, class_dim=1, repeats=..., generator=..., variant=...)` returns — the same permutations,
drawn from `generator` in the same order (repeat-major, then column 0, 1, …), the same distance, the same averaging
(float32 mean over samples, float64 sum over repeats), min-max normalised — up to float rounding.

Permuting input column c across the samples changes only the first layer's pre-activation, by a rank-1 term:
    W₁ x' + b₁ = (W₁ x + b₁) + W₁[:, c] ⊗ (x_c[π] − x_c),
so the clean pre-activation is computed once per group and every permuted copy costs one fused multiply-add of
(hidden × N) instead of copying the (D × N) input and a (hidden × D × N) matmul. The student's output, and its
non-target distribution, are fixed and computed once. Works for any stack `models.fit` trains (BatchedLinear layers
separated by ReLU, runs axis first).
"""
from __future__ import annotations

import torch
from torch import nn

from common.divergence import JS_VARIANTS
from common.saliency import minmax_normalize
from sklearn_exp.models import _linears, _log_mean_exp2


def _nontarget_classes(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(G, C − 1, N) ids of the non-target classes of every sample, increasing."""
    classes = torch.arange(n_classes, device=labels.device).view(1, n_classes, 1).expand(*labels.shape[:1],
                                                                                      n_classes, labels.shape[-1])
    keep = classes != labels.long().unsqueeze(1)
    return classes.transpose(1, 2)[keep.transpose(1, 2)].view(labels.shape[0], labels.shape[-1], n_classes - 1) \
        .transpose(1, 2).contiguous()


def _log_nontarget(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log p̂ over the C − 1 non-target classes (class axis 1): a gather and one fused log_softmax."""
    return z.gather(1, index.expand(*index.shape[:2], *z.shape[2:])).log_softmax(1)


def _js(log_s, log_t, variant: str) -> torch.Tensor:
    """Per-sample JS between non-target distributions given as log p̂ over the non-target classes (axis 1), the
    value of common.divergence.nontarget_js."""
    p_s, p_t = log_s.exp(), log_t.exp()
    if variant == "textbook":   # ½[KL(P‖M) + KL(Q‖M)] = ½ Σ [P log P + Q log Q − (P + Q) log M]
        s = p_s + p_t
        # M underflows to 0 only where P, Q ≤ 1e-38: those terms are 0 either way
        log_m = (s * 0.5).clamp_min_(torch.finfo(s.dtype).tiny).log_()
        terms = (p_t * log_t).add_(p_s * log_s).sub_(s.mul_(log_m))
    else:                       # the reference's ½[KL(M‖P) + KL(M‖Q)]
        log_m = _log_mean_exp2(log_s, log_t)
        terms = log_m.exp() * ((log_m - log_s) + (log_m - log_t))
    return terms.sum(1).mul_(0.5)


@torch.no_grad()
def input_saliency(teacher: nn.Module, student: nn.Module, x_t: torch.Tensor, x_s: torch.Tensor, y: torch.Tensor, *,
                   repeats: int = 10, generator: torch.Generator | None = None, variant: str = "textbook",
                   chunk: int = 10, normalize: bool = True) -> torch.Tensor:
    """(G, D) permutation saliency of the teacher's input columns; x_t (G, D, N), x_s (G, D', N), y (G, N).

    chunk: columns evaluated per block (memory ∝ chunk × hidden × N per group).
    """
    if variant not in JS_VARIANTS:
        raise ValueError(f"variant must be one of {JS_VARIANTS}, got {variant!r}")
    if repeats < 1 or chunk < 1:
        raise ValueError(f"repeats and chunk must be >= 1, got repeats={repeats}, chunk={chunk}")
    layers = _linears(teacher)
    first, rest = layers[0], layers[1:]
    groups, n_cols, n = x_t.shape
    modes = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    try:
        h_s = student(x_s)                                                  # (G, K, N), fixed
        n_classes = h_s.shape[1]
        index = _nontarget_classes(y, n_classes)                            # (G, K − 1, N)
        log_s = _log_nontarget(h_s, index)
        # the permutations of common.saliency.saliency_vector: one per (repeat, column), in that order
        gen_device = generator.device if generator is not None else torch.device("cpu")
        perms = torch.stack([torch.randperm(n, generator=generator, device=gen_device)
                             for _ in range(repeats * n_cols)]).to(x_t.device).view(repeats, n_cols, n)
        dist = torch.empty(repeats, groups, n_cols, dtype=h_s.dtype, device=x_t.device)
        for g in range(groups):
            x = x_t[g]                                                      # (D, N)
            w1 = first.weight[g]                                            # (H, D)
            base = torch.addmm(first.bias[g], w1, x).unsqueeze(1)           # (H, 1, N) clean pre-activation
            # (1, K − 1, 1, N): class axis 1 as everywhere here, broadcast over the k copies of axis 2
            idx, ls = index[g:g + 1].unsqueeze(2), log_s[g:g + 1].unsqueeze(2)
            for r in range(repeats):
                for c0 in range(0, n_cols, chunk):
                    cols = slice(c0, min(c0 + chunk, n_cols))
                    xc = x[cols]                                            # (k, N)
                    k = xc.shape[0]
                    delta = xc.gather(1, perms[r, cols]).sub_(xc)           # x_c[π] − x_c
                    h = torch.addcmul(base, w1[:, cols].unsqueeze(-1), delta.unsqueeze(0))   # (H, k, N)
                    h = h.relu_().view(h.shape[0], k * n)
                    for i, lin in enumerate(rest):
                        h = torch.addmm(lin.bias[g], lin.weight[g], h)
                        if i < len(rest) - 1:
                            h = h.relu_()
                    log_t = _log_nontarget(h.view(1, n_classes, k, n), idx)
                    dist[r, g, cols] = _js(ls, log_t, variant).mean(-1)[0]
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    # common.saliency's accumulation: float64 sum over repeats, × batch size / repeats, / samples
    total = dist.double().sum(0) * (n / repeats)
    saliency = (total / n).to(h_s.dtype)
    return minmax_normalize(saliency) if normalize else saliency
