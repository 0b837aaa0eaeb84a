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

Layout: the banks are stored feature-major, (G, f, n_data) (``memory_s`` / ``memory_t`` are (G, n_data, f) views of
them), so that normalising over f and gathering entries work along fast axes on CPU. When the embedding input is
narrower than f (D + 1 < f, e.g. 2 logits embedded in 8 dimensions), the score ⟨m_c, (W x_b + b)/‖W x_b + b‖⟩ is
computed as ⟨[W b]ᵀ m_c, [x_b; 1]⟩/‖W x_b + b‖: the bank is projected once per step onto the (D + 1)-dimensional
input space and the gathered entries (one per anchor and contrast index) are (D + 1)- instead of f-dimensional —
the same scores, several times less data to gather and multiply.

Gradients by autograd through these formulas (the synthetic engine, common.synthetic.fused_crd, forms the NCE's
score gradients in closed form). Only the small anchor embeddings (sample_rows of them) are in autograd's graph; the
memory update runs on all samples without it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common.kd.base import DistillLoss, register
from common.kd.relational import _cols, feature_major
from common.kd.layers import BatchedLinear


def _l2_normalize(x, dim: int, eps: float = 1e-12):
    """= F.normalize(x, dim=dim), written out: vector_norm is slow on CPU."""
    return x / (x * x).sum(dim, keepdim=True).sqrt().clamp_min(eps)


def nce_rows(dots, log_z, inv_t: float, c: float, log_kpn: float, neg_weight: float):
    """Per-anchor NCE loss (G, B) from the scores dots (G, K+1, B) (row 0 the positive).

    With log p = dots/T − log Z and c = K/n + ε the loss of anchor b is
        −log(p_0 / (p_0 + c)) − (K/draws) Σ_{k≥1} log((K/n) / (p_k + c))
    (CRD's eq. 18, each drawn negative standing for K/draws of them). The contrast axis K+1 sits in the middle
    (reductions over it are fast; a short last axis is not, on CPU).
    """
    log_p = dots * inv_t - log_z
    p = log_p.exp()
    p_c = p + c
    log_pc = p_c.log()
    return (log_pc[:, 0] - log_p[:, 0]
            + neg_weight * (log_pc[:, 1:].sum(1) - (dots.shape[1] - 1) * log_kpn))


@register("crd")
class CRDistill(DistillLoss):
    per_sample = False

    def __init__(self, student_dim: int, teacher_dim: int, n_data: int, feat_dim: int = 128, nce_k: int = 16384,
                 nce_t: float = 0.07, nce_m: float = 0.5, dataset_labels=None, draws: int | None = None,
                 sample_rows: int | None = None, eps: float = 1e-7, runs: int | None = None,
                 train_embeddings: bool = True):
        super().__init__(runs)
        g = self.groups
        self.n_data, self.nce_k, self.nce_t, self.nce_m, self.eps = int(n_data), int(nce_k), nce_t, nce_m, eps
        self.draws, self.sample_rows = int(draws or nce_k), sample_rows
        self.embed_s = BatchedLinear(student_dim, feat_dim, runs=g)
        self.embed_t = BatchedLinear(teacher_dim, feat_dim, runs=g)
        # train_embeddings False: the embeddings stay at their initial weights, as in the reference, whose optimiser
        # holds the student's parameters only (NTDH gauss/main.py, `train_kd`: SGD(student.parameters()))
        self.embed_s.requires_grad_(train_embeddings)
        self.embed_t.requires_grad_(train_embeddings)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        init = lambda: (torch.rand(g, self.n_data, feat_dim) * 2 * bound - bound).transpose(1, 2).contiguous()
        self.register_buffer("bank_s", init())  # (G, f, n_data), feature-major; memory_s is the (G, n, f) view
        self.register_buffer("bank_t", init())
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

    @property
    def memory_s(self) -> torch.Tensor:
        """The student's memory bank as (G, n_data, f) rows (a view of the feature-major buffer)."""
        return self.bank_s.transpose(1, 2)

    @property
    def memory_t(self) -> torch.Tensor:
        return self.bank_t.transpose(1, 2)

    def _contrast_index(self, idx, y):
        """(G, B, K+1) memory indices: column 0 the anchor itself, then K negatives."""
        g, b = idx.shape
        if not self.class_negatives:
            neg = torch.randint(self.n_data, (g, b, self.draws), device=idx.device)
            return torch.cat([idx.unsqueeze(-1), neg], -1)
        rows = torch.arange(g, device=idx.device).unsqueeze(1)
        count = self.class_count[rows, y].unsqueeze(-1)                         # (G, B, 1) anchor's class size
        start = self.class_start[rows, y].unsqueeze(-1)
        # in float32 (integers exact below 2^24), a single conversion at the end: int64 passes cost twice as much
        u = torch.rand(g, b, self.draws, device=idx.device).mul_(self.n_data - count).floor_()
        pos = u.addcmul_(count.to(u.dtype), (u >= start).to(u.dtype)).long()   # skip the anchor's class block
        neg = self.order.gather(1, pos.view(g, -1)).view(g, b, self.draws)
        return torch.cat([idx.unsqueeze(-1), neg], -1)

    def _factors(self, layer: BatchedLinear, x, bank, cidx):
        """The scores ⟨m_c, v_b⟩ of the anchors' embeddings v_b = normalize(W x_b + b) (x: (G, D, B)) against the
        entries of a (G, f, n) bank are ⟨left[:, c], right[:, b]⟩ with (left, right) returned here — or, for a small
        bank, the scores (G, K+1, B) themselves (cidx: (G, B, K+1))."""
        g, f, n = bank.shape
        d, b = x.shape[1:]
        e = torch.baddbmm(layer.bias, layer.weight, x)                                 # (G, f, B)
        e_norm = (e * e).sum(1, keepdim=True).sqrt().clamp_min(1e-12)                  # (G, 1, B)
        if n <= 4 * cidx.shape[-1]:
            # small bank: score every entry with one batched matmul, then pick — cheaper than gathering vectors
            return torch.bmm((e / e_norm).transpose(1, 2), bank).gather(2, cidx).transpose(1, 2)
        if d + 1 < f:
            # project the bank onto the input space: ⟨m_c, W x_b + b⟩/‖e_b‖ = ⟨[W b]ᵀ m_c, [x_b; 1]/‖e_b‖⟩
            proj = torch.cat([layer.weight, layer.bias], 2)                           # (G, f, D + 1)
            left = torch.bmm(proj.transpose(1, 2), bank)                              # (G, D + 1, n)
            right = torch.cat([x, x.new_ones(g, 1, b)], 1) / e_norm                   # (G, D + 1, B)
            return left, right
        return bank, e / e_norm

    def _scores(self, layer: BatchedLinear, x, bank, cidx):
        """Scores ⟨m_c, v_b⟩ (G, K+1, B) against the bank entries cidx (G, B, K+1) (see _factors)."""
        factors = self._factors(layer, x, bank, cidx)
        if not isinstance(factors, tuple):
            return factors
        left, right = factors
        g, r = left.shape[:2]
        k1, b = cidx.shape[2], cidx.shape[1]
        # entries laid out (G, ·, K+1, B): the anchor axis B last, so that nothing broadcasts along the last axis
        rows = left.gather(2, cidx.transpose(1, 2).reshape(g, 1, k1 * b).expand(-1, r, -1))
        return (rows.view(g, r, k1, b) * right.unsqueeze(2)).sum(1)

    def _nce_args(self, z, negatives: int):
        k_pn = self.nce_k / self.n_data
        return (z.log().view(-1, 1, 1), 1.0 / self.nce_t, k_pn + self.eps, math.log(k_pn),
                self.nce_k / negatives)

    def _direction(self, layer: BatchedLinear, x, bank, cidx, z, w):
        """Per-run NCE loss (G,) of the anchors x (G, D, B) against a (G, f, n) bank."""
        dots = self._scores(layer, x, bank, cidx)
        self._fix_normaliser(z, dots)
        rows = nce_rows(dots, *self._nce_args(z, cidx.shape[-1] - 1))
        return (rows if w is None else rows * w).mean(1)

    def _fix_normaliser(self, z, dots):
        """Z = n_data · mean exp(score / T), fixed at the first call (CRD's normaliser); -1 marks "not yet"."""
        if (z < 0).any():
            z.copy_(torch.where(z < 0, torch.exp(dots.detach() / self.nce_t).mean((1, 2)) * self.n_data, z))

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t = feature_major(self, student_out, "student_out"), feature_major(self, teacher_out, "teacher_out")
        g, b = s.shape[0], s.shape[2]
        full = index is None
        if full:
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
        m = self.sample_rows
        if m is not None and m < b:
            # m distinct random anchors per run (the m smallest of one uniform draw each, as subsample_rows)
            keep = torch.rand(g, b, device=s.device).topk(m, 1, largest=False, sorted=False).indices
            a_s, a_t, a_idx = _cols(s, keep), _cols(t, keep), idx.gather(1, keep)
            a_y = None if y is None else y.gather(1, keep)
            a_w = None if w is None else w.gather(1, keep)
        else:
            a_s, a_t, a_idx, a_y, a_w = s, t, idx, y, w
        cidx = self._contrast_index(a_idx, a_y)
        # student anchors against the teacher memory, teacher anchors against the student memory
        per_run = (self._direction(self.embed_s, a_s, self.bank_t, cidx, self.z_s, a_w)
                   + self._direction(self.embed_t, a_t, self.bank_s, cidx, self.z_t, a_w))
        # ω_b weights anchor b's terms, the normaliser stays the number of anchors (reduce_rows); summed over runs
        loss = per_run.sum()
        with torch.no_grad():  # momentum update, out of place: the old banks may be saved for this step's backward
            for name, layer, x in (("bank_s", self.embed_s, s), ("bank_t", self.embed_t, t)):
                bank = getattr(self, name)
                # in place on fresh tensors: every (G, f, B) allocation costs about as much as a pass over it
                v = torch.baddbmm(layer.bias, layer.weight, x)                              # (G, f, B)
                square = torch.mul(v, v)
                v.div_(square.sum(1, keepdim=True).sqrt_().clamp_min_(1e-12))
                if full:  # the batch is the whole bank in index order: no indexing needed
                    new = v.lerp_(bank, self.nce_m)                                         # m·bank + (1 − m)·v
                else:
                    cols = idx.unsqueeze(1).expand(-1, bank.shape[1], -1)
                    new = v.lerp_(bank.gather(2, cols), self.nce_m)
                new.div_(torch.mul(new, new, out=square).sum(1, keepdim=True).sqrt_().clamp_min_(1e-12))
                setattr(self, name, new if full else bank.scatter(2, cols, new))
        return loss
