"""Contrastive representation distillation (Tian et al. 2020) with a momentum memory bank — device-agnostic.

Both outputs are embedded by trainable linear maps (optimised with the student, unlike the reference) and
L2-normalised. Each anchor is contrasted with its own memory entry (positive) and K negatives drawn from the memory
of the other modality; the NCE loss of CRD's eq. 18 is applied to both directions and summed.

``index`` (dataset indices of the batch) is required unless the batch is the whole dataset (full-batch training).
With ``dataset_labels`` the negatives are drawn from other classes only (as the reference's class-aware sampler);
otherwise uniformly from the whole bank (CRD's original sampler). ω_b weights anchor b's NCE terms.

Cost control for full-batch training of many runs: ``draws`` < K draws that many negatives per anchor and weights
each by K/draws — an unbiased estimate of the same K-negative NCE sum (the reference draws its K negatives i.i.d.
with replacement) — and ``sample_rows`` uses that many random anchors per step. The memory bank is updated for
every sample of the batch either way.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.kd.base import DistillLoss, register
from common.vectorized import BatchedLinear


def _l2_normalize(x, eps: float = 1e-12):
    # = F.normalize(x, dim=-1), written out: vector_norm over a short last axis is slow on CPU
    return x / x.pow(2).sum(-1, keepdim=True).sqrt().clamp_min(eps)


@register("crd")
class CRDistill(DistillLoss):
    per_sample = False

    def __init__(self, student_dim: int, teacher_dim: int, n_data: int, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, nce_m: float = 0.5, dataset_labels=None, draws: int | None = None,
                 sample_rows: int | None = None, eps: float = 1e-7, runs: int | None = None):
        super().__init__(runs)
        g = self.groups
        self.n_data, self.nce_k, self.nce_t, self.nce_m, self.eps = int(n_data), int(nce_k), nce_t, nce_m, eps
        self.draws, self.sample_rows = int(draws or nce_k), sample_rows
        self.embed_s = BatchedLinear(student_dim, feat_dim, runs=g)
        self.embed_t = BatchedLinear(teacher_dim, feat_dim, runs=g)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(g, self.n_data, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(g, self.n_data, feat_dim) * 2 * bound - bound)
        self.register_buffer("z_s", torch.full((g,), -1.0))  # NCE normalisers, fixed at the first call
        self.register_buffer("z_t", torch.full((g,), -1.0))
        self.class_negatives = dataset_labels is not None
        if self.class_negatives:
            # Indices sorted by class, so "any index outside the anchor's class block" is one uniform draw.
            labels = torch.as_tensor(dataset_labels).long().reshape(-1, self.n_data).expand(g, -1)
            counts = F.one_hot(labels).sum(1)                                   # (G, n_classes)
            self.register_buffer("order", torch.sort(labels, dim=1, stable=True).indices)
            self.register_buffer("class_count", counts)
            self.register_buffer("class_start", counts.cumsum(1) - counts)

    def _contrast_index(self, idx, y):
        """(G, B, K+1) memory indices: column 0 the anchor itself, then K negatives."""
        g, b = idx.shape
        if not self.class_negatives:
            neg = torch.randint(self.n_data, (g, b, self.draws), device=idx.device)
            return torch.cat([idx.unsqueeze(-1), neg], -1)
        rows = torch.arange(g, device=idx.device).unsqueeze(1)
        count = self.class_count[rows, y].unsqueeze(-1)                         # (G, B, 1) anchor's class size
        start = self.class_start[rows, y].unsqueeze(-1)
        u = (torch.rand(g, b, self.draws, device=idx.device) * (self.n_data - count)).long()
        pos = u + count * (u >= start)                                          # skip the anchor's class block
        neg = self.order.gather(1, pos.view(g, -1)).view(g, b, self.draws)
        return torch.cat([idx.unsqueeze(-1), neg], -1)

    def _nce(self, anchors, memory, cidx, z, w):
        g, n, f = memory.shape
        if n <= 4 * cidx.shape[-1]:
            # small bank: score every entry with one batched matmul, then pick — cheaper than gathering vectors
            dots = torch.bmm(anchors, memory.transpose(1, 2)).gather(2, cidx)
        else:
            # rows of the (G·n, f) bank: index_select on contiguous rows beats fancy indexing on CPU
            flat = (cidx + torch.arange(g, device=cidx.device).view(g, 1, 1) * n).reshape(-1)
            bank = memory.reshape(g * n, f).index_select(0, flat).view(*cidx.shape, f)   # (G, B, K+1, f)
            dots = (bank * anchors.unsqueeze(2)).sum(-1)
        scores = torch.exp(dots / self.nce_t)
        if (z < 0).any():
            z.copy_(torch.where(z < 0, scores.detach().mean((1, 2)) * self.n_data, z))
        p = scores / z.view(g, 1, 1)
        k_pn = self.nce_k / self.n_data
        log_pos = torch.log(p[..., 0] / (p[..., 0] + k_pn + self.eps))
        log_neg = torch.log(k_pn / (p[..., 1:] + k_pn + self.eps)).mean(-1) * self.nce_k
        return self.reduce_rows(-(log_pos + log_neg), w)

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t = self._samples(student_out, "student_out"), self._samples(teacher_out, "teacher_out")
        g, b = s.shape[:2]
        if index is None:
            if b != self.n_data:
                raise ValueError(f"crd: pass index= (dataset indices) unless the batch is the whole dataset "
                                 f"(batch {b}, n_data {self.n_data})")
            index = torch.arange(b, device=s.device)
        # (B,) indices are shared by all runs; (R, B) gives each run its own
        idx = index.reshape(-1, b).expand(g, b).long()
        y = None if labels is None else self._per_row(labels, (g, b), "labels")
        if self.class_negatives and y is None:
            raise ValueError("crd: class-aware negatives (dataset_labels) need the labels")
        w = None if omega is None else self._per_row(omega, (g, b), "omega")
        # embeddings (G, N, f); the embed layers are feature-major, hence the transposes
        vs = _l2_normalize(self.embed_s(s.transpose(1, 2)).transpose(1, 2))
        vt = _l2_normalize(self.embed_t(t.transpose(1, 2)).transpose(1, 2))
        a_vs, a_vt, a_idx, a_y, a_w = self.subsample_rows(self.sample_rows, vs, vt, idx, y, w)
        cidx = self._contrast_index(a_idx, a_y)
        # student anchors against the teacher memory, teacher anchors against the student memory
        loss = self._nce(a_vs, self.memory_t, cidx, self.z_s, a_w) + self._nce(a_vt, self.memory_s, cidx, self.z_t, a_w)
        with torch.no_grad():  # momentum update, out of place: the old banks are saved for this step's backward
            ar = torch.arange(g, device=s.device).view(g, 1)
            for name, v in (("memory_s", vs), ("memory_t", vt)):
                memory = getattr(self, name)
                updated = _l2_normalize(memory[ar, idx] * self.nce_m + v.detach() * (1 - self.nce_m))
                setattr(self, name, memory.index_put((ar, idx), updated))
        return loss
