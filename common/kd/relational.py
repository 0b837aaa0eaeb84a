"""Relational distillation terms: ``rkd`` (distance + angle), ``pkt`` (probabilistic) and ``sp`` (similarity-
preserving). They compare how samples of a batch relate to each other, so each sample is one flattened vector.

ω (per sample) acts as soft membership in the batch: pair (i, j) gets weight ω_i·ω_j (triplet (i, j, k) gets
ω_i·ω_j·ω_k), and every normaliser (row sums, row norms, mean distance, the final average) is the weighted one.
Hence ω = 1 gives the unweighted loss and ω_i = 0 gives exactly the loss of the batch without sample i.

``sample_rows=m`` estimates the loss on m random samples of the batch per call (per run): full-batch synthetic
training has N = 200..6000 samples per run, and N² pairs × hundreds of runs is far too much work per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.kd.base import DistillLoss, register


class _Relational(DistillLoss):
    per_sample = False

    def __init__(self, sample_rows: int | None = None, runs: int | None = None):
        super().__init__(runs)
        self.sample_rows = sample_rows

    def _prepare(self, student_out, teacher_out, omega):
        """(G, N, D) student and teacher samples and (G, N) weights, subsampled to sample_rows."""
        s, t = self._samples(student_out, "student_out"), self._samples(teacher_out, "teacher_out")
        w = self._per_row(omega, s.shape[:2], "omega")
        w = torch.ones(s.shape[:2], dtype=s.dtype, device=s.device) if w is None else w.to(s.dtype)
        return self.subsample_rows(self.sample_rows, s, t, w)


def _pair_weights(w):
    return w.unsqueeze(2) * w.unsqueeze(1)  # (G, N, N)


def _wmean(values, weights, dims):
    return (values * weights).sum(dims) / weights.sum(dims).clamp_min(1e-12)


@register("pkt")
class PKTDistill(_Relational):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018).

    Rows are L2-normalised, similarities mapped to [0, 1] by (cos + 1)/2 and turned into conditional distributions
    over the batch by dividing each row by its (ω-weighted) sum; loss = mean_ij t_ij log((t_ij + ε)/(s_ij + ε)).
    """

    def __init__(self, eps: float = 1e-7, sample_rows: int | None = None, runs: int | None = None):
        super().__init__(sample_rows, runs)
        self.eps = eps

    def _conditional(self, x, w):
        x = x / (x.norm(dim=-1, keepdim=True) + self.eps)
        x = torch.nan_to_num(x)
        sim = (x @ x.transpose(1, 2) + 1) / 2
        return sim / (sim * w.unsqueeze(1)).sum(-1, keepdim=True)

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t, w = self._prepare(student_out, teacher_out, omega)
        ps, pt = self._conditional(s, w), self._conditional(t, w)
        kl = pt * torch.log((pt + self.eps) / (ps + self.eps))
        return _wmean(kl, _pair_weights(w), (1, 2)).sum()


@register("sp")
class SPDistill(_Relational):
    """Similarity-preserving KD (Tung & Mori 2019): ‖norm(S Sᵀ) − norm(T Tᵀ)‖²_F / N² with row-L2-normalised Gram
    matrices."""

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t, w = self._prepare(student_out, teacher_out, omega)

        def gram(x):
            g = x @ x.transpose(1, 2)
            row_norm = (g.pow(2) * w.unsqueeze(1)).sum(-1, keepdim=True).sqrt().clamp_min(1e-12)
            return g / row_norm

        return _wmean((gram(t) - gram(s)).pow(2), _pair_weights(w), (1, 2)).sum()


def _pdist(e, eps=1e-12):
    sq = e.pow(2).sum(-1)
    d2 = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * e @ e.transpose(1, 2)).clamp_min(eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(e.shape[1], dtype=e.dtype, device=e.device))  # exact zeros on the diagonal


@register("rkd")
class RKDistill(_Relational):
    """Relational KD (Park et al. 2019): w_d · distance term + w_a · angle term, both smooth-L1.

    Exact mode (pairs/triplets None) uses all N² pairs and N³ triplets — O(N³) memory, fine for minibatches.
    For full-batch training on thousands of samples set ``pairs`` / ``triplets``: each call then draws that many
    uniformly random pairs (i, j) and triplets (i; j, k) per group — degenerate ones included, exactly as the exact
    mode's N² and N³ averages include them — so each term is an unbiased estimate of its exact average; the distance
    normaliser is the mean over the drawn pairs with i ≠ j (the reference's pairwise form cannot run at N = 6000).
    """

    def __init__(self, w_d: float = 25.0, w_a: float = 50.0, pairs: int | None = None,
                 triplets: int | None = None, sample_rows: int | None = None, runs: int | None = None):
        super().__init__(sample_rows, runs)
        self.w_d, self.w_a, self.pairs, self.triplets = float(w_d), float(w_a), pairs, triplets

    # exact ----------------------------------------------------------------------------------------------------
    def _exact(self, s, t, w):
        pw = _pair_weights(w)
        off = pw * (1 - torch.eye(s.shape[1], dtype=s.dtype, device=s.device))

        def dist(e):
            d = _pdist(e)
            return d / _wmean(d, off, (1, 2)).view(-1, 1, 1).clamp_min(1e-12)

        def angles(e):
            u = F.normalize(e.unsqueeze(1) - e.unsqueeze(2), p=2, dim=-1)  # u[g,i,j] = unit(e_j − e_i)
            return u @ u.transpose(2, 3)                                    # [g,i,j,k] = ⟨u_ij, u_ik⟩

        with torch.no_grad():
            dt, at = dist(t), angles(t)
        loss_d = _wmean(F.smooth_l1_loss(dist(s), dt, reduction="none"), pw, (1, 2))
        tw = pw.unsqueeze(3) * w.unsqueeze(1).unsqueeze(1)
        loss_a = _wmean(F.smooth_l1_loss(angles(s), at, reduction="none"), tw, (1, 2, 3))
        return loss_d, loss_a

    # sampled --------------------------------------------------------------------------------------------------
    def _sampled(self, s, t, w):
        g, n, d = s.shape
        draw = lambda k: torch.randint(n, (g, k), device=s.device)

        def pick(x, ix):  # (G, N, D) rows at ix (G, K) → (G, K, D); gather is much faster than fancy indexing
            return x.gather(1, ix.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

        i, j = draw(self.pairs), draw(self.pairs)
        pw = w.gather(1, i) * w.gather(1, j)
        distinct = pw * (i != j).to(pw.dtype)

        def dist(e):
            dd = (pick(e, i) - pick(e, j)).pow(2).sum(-1).clamp_min(1e-12).sqrt() * (i != j).to(e.dtype)
            return dd / _wmean(dd, distinct, 1).unsqueeze(1).clamp_min(1e-12)

        a, b, c = draw(self.triplets), draw(self.triplets), draw(self.triplets)
        tw = w.gather(1, a) * w.gather(1, b) * w.gather(1, c)

        def angles(e):
            ea = pick(e, a)
            return (F.normalize(pick(e, b) - ea, p=2, dim=-1) * F.normalize(pick(e, c) - ea, p=2, dim=-1)).sum(-1)

        with torch.no_grad():
            dt, at = dist(t), angles(t)
        loss_d = _wmean(F.smooth_l1_loss(dist(s), dt, reduction="none"), pw, 1)
        loss_a = _wmean(F.smooth_l1_loss(angles(s), at, reduction="none"), tw, 1)
        return loss_d, loss_a

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t, w = self._prepare(student_out, teacher_out, omega)
        if (self.pairs is None) != (self.triplets is None):
            raise ValueError("rkd: set both pairs and triplets (sampled mode) or neither (exact mode)")
        loss_d, loss_a = self._exact(s, t, w) if self.pairs is None else self._sampled(s, t, w)
        return (self.w_d * loss_d + self.w_a * loss_a).sum()
