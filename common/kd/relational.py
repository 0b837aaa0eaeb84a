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


def feature_major(term: DistillLoss, x: torch.Tensor, name: str) -> torch.Tensor:
    """Samples → (G, D, N), feature-major: (R, D, N) as given with runs, (B, ...) → (1, D, B) without (a view).

    Sample-major (G, N, D) would put the short feature axis last, which makes the per-sample norms, sums and
    gathers several times slower on CPU; Gram matrices are one bmm of (G, N, D) @ (G, D, N) either way.
    """
    if term.runs is not None:
        return term._rows(x, name)
    if x.dim() < 2:
        raise ValueError(f"{term.name}: {name} must have shape (B, D, ...), got {tuple(x.shape)}")
    return x.flatten(1).t().unsqueeze(0)


class _Relational(DistillLoss):
    per_sample = False

    def __init__(self, sample_rows: int | None = None, runs: int | None = None):
        super().__init__(runs)
        self.sample_rows = sample_rows

    def _features(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return feature_major(self, x, name)

    def _prepare(self, student_out, teacher_out, omega):
        """(G, D, N) student and teacher samples and (G, N) weights, subsampled to sample_rows."""
        s, t = self._features(student_out, "student_out"), self._features(teacher_out, "teacher_out")
        g, n = s.shape[0], s.shape[2]
        w = self._per_row(omega, (g, n), "omega")
        w = torch.ones(g, n, dtype=s.dtype, device=s.device) if w is None else w.to(s.dtype)
        m = self.sample_rows
        if m is None or m >= n:
            return s, t, w
        # the same m distinct random samples per group as base.subsample_rows (the m smallest of one uniform
        # draw per sample), found with topk instead of a full argsort (3× faster at N = 200)
        keep = torch.rand(g, n, device=s.device).topk(m, 1, largest=False, sorted=False).indices
        return _cols(s, keep), _cols(t, keep), w.gather(1, keep)


def _cols(x, ix):
    """(G, D, N) columns at ix (G, K) → (G, D, K); gather is much faster than fancy indexing on CPU."""
    return x.gather(2, ix.unsqueeze(1).expand(-1, x.shape[1], -1))


def _pair_weights(w):
    return w.unsqueeze(2) * w.unsqueeze(1)  # (G, N, N)


def _wmean(values, weights, dims):
    return (values * weights).sum(dims) / weights.sum(dims).clamp_min(1e-12)


def _pair_wsum(values, w):
    """Σ_ij w_i w_j values_ij per group for (G, N, N) values, without materialising the (G, N, N) weights."""
    return (torch.bmm(values, w.unsqueeze(2)).squeeze(2) * w).sum(1)


def _pair_wnorm(w):
    """Σ_ij w_i w_j = (Σ_i w_i)², the normaliser of every pair average (clamped as _wmean's)."""
    return w.sum(1).pow(2).clamp_min(1e-12)


@register("pkt")
class PKTDistill(_Relational):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018).

    Rows are L2-normalised, similarities mapped to [0, 1] by (cos + 1)/2 and turned into conditional distributions
    over the batch by dividing each row by its (ω-weighted) sum; loss = mean_ij t_ij log((t_ij + ε)/(s_ij + ε)).

    Computed with log(s_ij + ε) = log(sim_ij + ε·r_i) − log r_i (r_i the row sum), which never materialises the
    student's distribution.
    """

    def __init__(self, eps: float = 1e-7, sample_rows: int | None = None, runs: int | None = None):
        super().__init__(sample_rows, runs)
        self.eps = eps

    def _unit(self, x):
        return torch.nan_to_num(x / (x.pow(2).sum(1, keepdim=True).sqrt() + self.eps))

    @staticmethod
    def _similarity(x, w):
        """Unit columns (G, D, N) → similarities (G, N, N) in [0, 1] and their ω-weighted row sums (G, N, 1)."""
        sim = torch.baddbmm(x.new_tensor(0.5), x.transpose(1, 2), x, alpha=0.5)  # (cos + 1)/2 in one op
        return sim, (sim.sum(2, keepdim=True) if w is None else torch.bmm(sim, w.unsqueeze(2)))

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t, w = self._prepare(student_out, teacher_out, omega)
        w_rows = None if omega is None else w          # ω = None: every weight 1, skip the products
        sim_t, rows_t = self._similarity(self._unit(t), w_rows)
        pt = sim_t / rows_t
        a = pt if w_rows is None else pt * _pair_weights(w)                            # ω_i ω_j t_ij
        teacher_term = (a * (pt + self.eps).log()).sum((1, 2))
        inv_norm = 1.0 / _pair_wnorm(w)
        student_term = self._student_term(self._unit(s), a, w_rows)
        return ((teacher_term - student_term) * inv_norm).sum()

    def _student_term(self, x, a, w_rows):
        """Σ_ij a_ij log(s_ij + ε) per group for unit student columns x, s_ij = sim_ij / r_i, as
        Σ a_ij log(sim_ij + ε r_i) − Σ_i a_i log r_i."""
        sim_s, rows_s = self._similarity(x, w_rows)
        return (a * torch.add(sim_s, rows_s, alpha=self.eps).log()).sum((1, 2)) \
            - (a.sum(2) * rows_s.squeeze(2).log()).sum(1)


@register("sp")
class SPDistill(_Relational):
    """Similarity-preserving KD (Tung & Mori 2019): ‖norm(S Sᵀ) − norm(T Tᵀ)‖²_F / N² with row-L2-normalised Gram
    matrices (ω-weighted row norms and average)."""

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t, w = self._prepare(student_out, teacher_out, omega)
        w_rows = None if omega is None else w
        inv_norm = 1.0 / _pair_wnorm(w)
        return (self._distance(s, t, w, w_rows) * inv_norm).sum()

    def _distance(self, s, t, w, w_rows):
        """Σ_ij ω_i ω_j (T_ij − S_ij)² per group, S and T the row-normalised Gram matrices."""
        diff = _sp_gram(t, w_rows)[0] - _sp_gram(s, w_rows)[0]
        return _pair_wsum(diff * diff, w)


def _sp_gram(x, w):
    """(G, D, N) → row-normalised Gram matrix (G, N, N), the raw Gram matrix and the row norms (G, N, 1); the row
    norms are ω-weighted over the columns (w None: all weights 1)."""
    g = torch.bmm(x.transpose(1, 2), x)
    sq = g * g
    row_sq = sq.sum(2, keepdim=True) if w is None else torch.bmm(sq, w.unsqueeze(2))
    row_norm = row_sq.sqrt().clamp_min(1e-12)
    return g / row_norm, g, row_norm


def _pdist(e, eps=1e-12):
    sq = e.pow(2).sum(-1)
    d2 = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * e @ e.transpose(1, 2)).clamp_min(eps)
    d = d2.sqrt()
    return d * (1 - torch.eye(e.shape[1], dtype=e.dtype, device=e.device))  # exact zeros on the diagonal


def unit_differences(e):
    """u[g, i, j] = (e_j − e_i)/max(‖e_j − e_i‖, 1e-12) of (G, N, D) samples: (G, N, N, D), as RepDistiller's
    RKDLoss normalises its pairwise differences (zero on the diagonal)."""
    diff = e.unsqueeze(1) - e.unsqueeze(2)
    return diff / _norm_floor((diff * diff).sum(-1, keepdim=True))   # F.normalize's, without its slow D = 2 norm


def _norm_floor(sq, eps=1e-12):
    """max(‖x‖, eps) from ‖x‖² — F.normalize's denominator. Clamping before the sqrt keeps the gradient 0 (not
    0·∞ = NaN) for zero vectors, as F.normalize's is."""
    return sq.clamp_min(eps * eps).sqrt()


@register("rkd")
class RKDistill(_Relational):
    """Relational KD (Park et al. 2019): w_d · distance term + w_a · angle term, both smooth-L1.

    Exact mode (pairs/triplets None) uses all N² pairs and N³ triplets — O(N³) memory here, fine for minibatches
    (common.synthetic.fused_relational.FusedRKD computes the same in O(N²) memory for full-batch runs).
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
        s, t = s.transpose(1, 2), t.transpose(1, 2)  # (G, N, D): small N only, layout does not matter here
        return self._exact_distance(s, t, w), self._exact_angle(s, t, w)

    @staticmethod
    def _exact_distance(s, t, w):
        """The distance term over all N² pairs (G,), from (G, N, D) samples."""
        pw = _pair_weights(w)
        off = pw * (1 - torch.eye(s.shape[1], dtype=s.dtype, device=s.device))

        def dist(e):
            d = _pdist(e)
            return d / _wmean(d, off, (1, 2)).view(-1, 1, 1).clamp_min(1e-12)

        with torch.no_grad():
            dt = dist(t)
        return _wmean(F.smooth_l1_loss(dist(s), dt, reduction="none"), pw, (1, 2))

    def _exact_angle(self, s, t, w):
        """The angle term over all N³ triplets (G,), from (G, N, D) samples: one (G, N, N, N) tensor."""
        def angles(e):
            u = unit_differences(e)
            return u @ u.transpose(2, 3)                                    # [g,i,j,k] = ⟨u_ij, u_ik⟩

        with torch.no_grad():
            at = angles(t)
        tw = _pair_weights(w).unsqueeze(3) * w.unsqueeze(1).unsqueeze(1)
        return _wmean(F.smooth_l1_loss(angles(s), at, reduction="none"), tw, (1, 2, 3))

    # sampled --------------------------------------------------------------------------------------------------
    def _sampled(self, s, t, w, weighted: bool):
        g, n = s.shape[0], s.shape[2]
        p, k = self.pairs, self.triplets
        # one draw for every index (i, j of the pairs, then a; b, c of the triplets), one gather of their columns
        ix = torch.randint(n, (g, 2 * p + 3 * k), device=s.device)
        distinct = (ix[:, :p] != ix[:, p:2 * p]).to(s.dtype)
        if weighted:
            wx = w.gather(1, ix)
            pw = wx[:, :p] * wx[:, p:2 * p]
            tw = wx[:, 2 * p:2 * p + k] * wx[:, 2 * p + k:2 * p + 2 * k] * wx[:, 2 * p + 2 * k:]
            dw = pw * distinct
        else:  # ω = None: every weight is 1
            pw = tw = None
            dw = distinct
        with torch.no_grad():
            teacher = _rkd_geometry(_cols(t, ix), p, k, distinct, dw)
        return self._sampled_loss(s, ix, teacher, pw, tw, distinct, dw)

    def _sampled_loss(self, s, ix, teacher: "_Geometry", pw, tw, distinct, dw):
        """w_d · L_d + w_a · L_a per group at the drawn columns ix; pw / tw the pair / triplet weights (None: 1)."""
        p, k = teacher.ds.shape[1], teacher.cos.shape[1]
        student = _rkd_geometry(_cols(s, ix), p, k, distinct, dw)

        def mean(values, weights):
            return values.mean(1) if weights is None else _wmean(values, weights, 1)

        loss_d = mean(F.smooth_l1_loss(student.ds, teacher.ds, reduction="none"), pw)
        loss_a = mean(F.smooth_l1_loss(student.cos, teacher.cos, reduction="none"), tw)
        return self.w_d * loss_d + self.w_a * loss_a

    def forward(self, student_out, teacher_out, labels=None, omega=None, index=None):
        s, t, w = self._prepare(student_out, teacher_out, omega)
        if (self.pairs is None) != (self.triplets is None):
            raise ValueError("rkd: set both pairs and triplets (sampled mode) or neither (exact mode)")
        if self.pairs is None:
            loss_d, loss_a = self._exact(s, t, w)
            return (self.w_d * loss_d + self.w_a * loss_a).sum()
        return self._sampled(s, t, w, omega is not None).sum()


class _Geometry:
    """Intermediate values of the sampled RKD geometry of one side (see _rkd_geometry)."""

    def __init__(self, **values):
        self.__dict__.update(values)


def _rkd_geometry(x, p: int, k: int, distinct, dw) -> _Geometry:
    """Sampled RKD geometry of gathered columns x (G, D, 2p + 3k) = [i | j | a | b | c]: normalised pair distances
    ds (G, p) and triplet angle cosines cos (G, k), with the intermediates the closed-form gradient reuses.

    ds = d/μ with d_ij = ‖x_j − x_i‖·1[i ≠ j] and μ the dw-weighted mean of d (clamped at 1e-12); cos is
    ⟨normalize(x_b − x_a), normalize(x_c − x_a)⟩ with F.normalize's max(‖·‖, 1e-12) denominators. Sums run over the
    feature axis 1.
    """
    # split, not slicing: its backward is one concatenation, slicing's one zero-filled copy per slice
    xi, xj, xa, xb, xc = x.split([p, p, k, k, k], 2)
    dij = xj - xi
    r = (dij * dij).sum(1)
    root = r.clamp_min(1e-12).sqrt()
    d = root * distinct
    dw_sum = dw.sum(1, keepdim=True).clamp_min(1e-12)
    mu = (d * dw).sum(1, keepdim=True) / dw_sum
    mu_c = mu.clamp_min(1e-12)
    u, v = xb - xa, xc - xa
    uu, vv, uv = (u * u).sum(1), (v * v).sum(1), (u * v).sum(1)
    nu, nv = _norm_floor(uu), _norm_floor(vv)
    return _Geometry(dij=dij, r=r, root=root, d=d, dw_sum=dw_sum, mu=mu, mu_c=mu_c, ds=d / mu_c, u=u, v=v, uu=uu,
                     vv=vv, nu=nu, nv=nv, cos=uv / (nu * nv))
