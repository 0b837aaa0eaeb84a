"""Closed-form student gradients of the relational KD terms (PKT, SP, RKD) for the synthetic engine.

The plain references are common.kd.relational's PKTDistill, SPDistill and RKDistill (autograd through their
formulas). Here each term's student gradient is formed during the forward pass, in about a third of autograd's tensor
passes, whenever the teacher and ω are constant (the usual case: a frozen teacher, a detached ω); otherwise the
reference runs. The values and gradients equal the references' up to float rounding (tests/golden, test_kd_losses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common.kd.relational import (PKTDistill, RKDistill, SPDistill, _Geometry, _rkd_geometry, _sp_gram,
                                  unit_differences)


class FusedPKT(PKTDistill):
    def _student_term(self, x, a, w_rows):
        if a.requires_grad:          # a teacher or an ω with a gradient: the reference
            return super()._student_term(x, a, w_rows)
        return _PKTStudent.apply(x, a, w_rows, self.eps)


class FusedSP(SPDistill):
    def _distance(self, s, t, w, w_rows):
        if t.requires_grad or w.requires_grad:
            return super()._distance(s, t, w, w_rows)
        with torch.no_grad():
            gram_t = _sp_gram(t, w_rows)[0]
        return _SPStudent.apply(s, gram_t, w_rows)


class FusedRKD(RKDistill):
    def _sampled_loss(self, s, ix, teacher: _Geometry, pw, tw, distinct, dw):
        if pw is not None and pw.requires_grad:   # ω with a gradient (mask parity mode): the reference
            return super()._sampled_loss(s, ix, teacher, pw, tw, distinct, dw)
        return _RKDSampledLoss.apply(s, ix, teacher.ds, teacher.cos, pw, tw, distinct, dw, self.w_d, self.w_a)

    def _exact_angle(self, s, t, w):
        """The exact angle term without its (G, N, N, N) tensors (_RKDAngleSum): memory O(G·N²·D) instead of
        O(G·N³), which is what lets hundreds of full-batch runs use exact RKD (gauss --parity)."""
        if t.requires_grad:
            return super()._exact_angle(s, t, w)
        with torch.no_grad():
            v = unit_differences(t)
        weights = None if not w.requires_grad and bool((w == 1).all()) else w
        total = _RKDAngleSum.apply(unit_differences(s), v, weights)
        return total / (w.sum(1).pow(3).clamp_min(1e-12))     # Σ_ijk ω_i ω_j ω_k = (Σ_i ω_i)³


#: elements of one block of _RKDAngleSum's (groups, anchors, N, N) tensors, per device type: on a CPU 1 MiB of
#: float32, which stays in a core's L2 cache through the block's passes (bench/rkd_exact.py --block); on a GPU
#: 512 MiB, so that a step is a few dozen kernel launches, not thousands
ANGLE_BLOCK = {"cpu": 1 << 18, "cuda": 1 << 27}


class _PKTStudent(torch.autograd.Function):
    """Σ_ij a_ij log(s_ij + ε) per group (G,) from unit student columns x (G, D, N), s_ij = sim_ij / r_i, with the
    gradient w.r.t. x computed in closed form during the forward pass (a, ω constant).

    With q_ij = sim_ij + ε r_i the value is Σ a_ij log q_ij − Σ_i a_i log r_i (a_i = Σ_j a_ij), and
        ∂/∂sim_ij = a_ij/q_ij − ω_j ρ_i,   ρ_i = a_i/r_i − ε Σ_j a_ij/q_ij   (r_i = Σ_j ω_j sim_ij),
        ∂/∂x = ½ x (Γ + Γᵀ)   for sim = (xᵀx + 1)/2 and Γ = ∂/∂sim.
    """

    @staticmethod
    def forward(ctx, x, a, w, eps: float):
        # in place wherever a (G, N, N) tensor is not needed again: fresh allocations cost about a pass each
        q, rows = PKTDistill._similarity(x, w)
        q.add_(rows, alpha=eps)                                                           # sim + ε·r
        a_rows = a.sum(2, keepdim=True)
        a_q = a / q
        value = q.log_().mul_(a).sum((1, 2)) - (a_rows * rows.log()).sum((1, 2))
        rho = a_rows / rows - eps * a_q.sum(2, keepdim=True)                            # (G, N, 1)
        w_cols = torch.ones_like(rho).transpose(1, 2) if w is None else w.unsqueeze(1)
        gamma = a_q.baddbmm_(rho, w_cols, alpha=-1)                                      # a/q − ρ_i ω_j
        ctx.save_for_backward(torch.bmm(x, gamma + gamma.transpose(1, 2)).mul_(0.5))
        return value

    @staticmethod
    def backward(ctx, grad_value):
        grad, = ctx.saved_tensors
        return grad * grad_value.view(-1, 1, 1), None, None, None


class _SPStudent(torch.autograd.Function):
    """Σ_ij ω_i ω_j (T_ij − S_ij)² per group (G,), S = row-normalised Gram matrix of the student columns x (G, D, N),
    with the gradient w.r.t. x computed in closed form during the forward pass (teacher T and ω constant).

    With g = xᵀx, n_i = max(√(Σ_j ω_j g_ij²), 1e-12), S = g/n and d = T − S:
        ∂/∂g_ij = −2 ω_i ω_j (d_ij − S_ij c_i)/n_i,   c_i = Σ_k ω_k d_ik S_ik   (c_i = 0 where n_i is clamped),
        ∂/∂x = x (Γ + Γᵀ)   for Γ = ∂/∂g.
    """

    @staticmethod
    def forward(ctx, x, gram_t, w):
        # _sp_gram written in place (one scratch tensor reused): fresh (G, N, N) allocations cost about a pass each
        wsum = (lambda m: m.sum(2, keepdim=True)) if w is None else (lambda m: torch.bmm(m, w.unsqueeze(2)))
        gram_s = torch.bmm(x.transpose(1, 2), x)
        scratch = gram_s * gram_s
        row_norm = wsum(scratch).sqrt_().clamp_min_(1e-12)
        gram_s.div_(row_norm)
        d = gram_t - gram_s
        rows = wsum(torch.mul(d, d, out=scratch))                                        # (G, N, 1)
        value = (rows.squeeze(2) if w is None else rows.squeeze(2) * w).sum(1)
        c = wsum(torch.mul(d, gram_s, out=scratch)) * (row_norm > 1e-12).to(x.dtype)
        coef = -2.0 / row_norm if w is None else (-2.0 * w.unsqueeze(2)) / row_norm       # (G, N, 1)
        gamma = d.addcmul_(gram_s, c, value=-1).mul_(coef)
        if w is not None:
            gamma.mul_(w.unsqueeze(1))
        ctx.save_for_backward(torch.bmm(x, gamma + gamma.transpose(1, 2)))
        return value

    @staticmethod
    def backward(ctx, grad_value):
        grad, = ctx.saved_tensors
        return grad * grad_value.view(-1, 1, 1), None, None


class _RKDSampledLoss(torch.autograd.Function):
    """Per-group sampled RKD loss w_d·L_d + w_a·L_a (G,) from the student's samples s (G, D, N) at the drawn columns,
    with its gradient w.r.t. s computed in closed form during the forward pass (constant weights and teacher).

    L_d = Σ_q pw_q h(ds_q − dt_q) / Σ pw and L_a = Σ_t tw_t h(cos_t − at_t) / Σ tw with h the smooth-L1 (β = 1),
    h' = clamp(·, −1, 1). With γ = w_d·pw·h'/Σpw and α = w_a·tw·h'/Σtw:
        ∂/∂d_q   = γ_q/μ − (Σ_p γ_p d_p)/μ² · dw_q/Σdw            (the second term only while μ > 1e-12)
        ∂/∂x_j   = −∂/∂x_i = ∂/∂d_ij · 1[i ≠ j] · (x_j − x_i)/‖x_j − x_i‖   (0 while ‖·‖² < 1e-12)
        ∂/∂u     = α (v/(‖u‖‖v‖) − cos·u/‖u‖²)   (u = x_b − x_a; likewise v = x_c − x_a),  ∂/∂x_a = −∂/∂u − ∂/∂v
    — the derivatives autograd would take through the same formulas, in about a third of the tensor passes.
    """

    @staticmethod
    def forward(ctx, s, ix, dt, at, pw, tw, distinct, dw, w_d: float, w_a: float):
        """s (G, D, N) student samples, ix (G, 2p + 3k) the drawn columns [i | j | a | b | c]; pw (G, p) and tw (G, k)
        the pair / triplet weights (None: all 1), dw = pw · distinct."""
        p, k = dt.shape[1], at.shape[1]
        cols = ix.unsqueeze(1).expand(-1, s.shape[1], -1)
        geo = _rkd_geometry(s.gather(2, cols), p, k, distinct, dw)

        def weighted_mean_and_scale(values, weights, count):
            if weights is None:
                return values.sum(1) / count, 1.0 / count
            total = weights.sum(1, keepdim=True).clamp_min(1e-12)
            return (values * weights).sum(1) / total.squeeze(1), weights / total

        loss_d, scale_d = weighted_mean_and_scale(F.smooth_l1_loss(geo.ds, dt, reduction="none"), pw, p)
        loss_a, scale_a = weighted_mean_and_scale(F.smooth_l1_loss(geo.cos, at, reduction="none"), tw, k)
        loss = w_d * loss_d + w_a * loss_a
        # gradient w.r.t. the gathered columns, written straight into one buffer laid out like them
        grad = torch.empty(cols.shape, dtype=s.dtype, device=s.device)
        g_i, g_j, g_a, g_b, g_c = grad.split([p, p, k, k, k], 2)
        # distances
        gamma = (geo.ds - dt).clamp_(-1, 1).mul_(scale_d).mul_(w_d)
        through_mu = (gamma * geo.d).sum(1, keepdim=True) / geo.mu_c.pow(2) * (geo.mu >= 1e-12).to(s.dtype)
        grad_d = gamma.div_(geo.mu_c).sub_(through_mu * dw / geo.dw_sum)
        grad_r = grad_d.mul_(distinct).mul_((geo.r >= 1e-12).to(s.dtype)).div_(geo.root)
        torch.mul(geo.dij, grad_r.unsqueeze(1), out=g_j)
        torch.neg(g_j, out=g_i)
        # angles
        alpha = (geo.cos - at).clamp_(-1, 1).mul_(scale_a).mul_(w_a)
        c_uv = (alpha / (geo.nu * geo.nv)).unsqueeze(1)
        c_u = (alpha * geo.cos / (geo.nu * geo.nu) * (geo.uu >= 1e-24).to(s.dtype)).unsqueeze(1)
        c_v = (alpha * geo.cos / (geo.nv * geo.nv) * (geo.vv >= 1e-24).to(s.dtype)).unsqueeze(1)
        torch.mul(geo.v, c_uv, out=g_b).addcmul_(geo.u, c_u, value=-1)
        torch.mul(geo.u, c_uv, out=g_c).addcmul_(geo.v, c_v, value=-1)
        torch.add(g_b, g_c, out=g_a).neg_()
        # scattered back onto the samples here: the backward pass then only scales a (G, D, N) tensor
        ctx.save_for_backward(torch.zeros_like(s).scatter_add_(2, cols, grad))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, = ctx.saved_tensors
        return grad * grad_loss.view(-1, 1, 1), None, None, None, None, None, None, None, None, None


class _RKDAngleSum(torch.autograd.Function):
    """Σ_ijk ω_i ω_j ω_k h(⟨u_ij, u_ik⟩ − ⟨v_ij, v_ik⟩) per group (G,), h the smooth-L1 (β = 1), from the unit
    pairwise differences u (student, G × N × N × D) and v (constant teacher) and weights ω (G, N) (None: all 1).

    The (N, N, N) angle tensors are formed a block of (group, anchor i) slices at a time (ANGLE_BLOCK elements) and
    dropped; bench/rkd_exact.py measures it against the reference's autograd. With u_i the (N, D) slice of anchor i,
    a_i = u_i u_iᵀ, h' = clamp(·, −1, 1) and r_ij = Σ_k h_ijk ω_k (h, a symmetric in j, k):
        ∂/∂u_ij = 2 ω_i ω_j Σ_k h'_ijk ω_k u_ik,     ∂/∂ω_m = Σ_j ω_j r_mj + 2 Σ_i ω_i r_im,
    both accumulated in the same pass; the backward pass only scales them.
    """

    @staticmethod
    def forward(ctx, u, v, w):
        g_all, n = u.shape[:2]
        block = ANGLE_BLOCK.get(u.device.type, ANGLE_BLOCK["cuda"])
        anchors = max(1, min(n, block // (n * n)))
        groups = max(1, min(g_all, block // (anchors * n * n)))
        total = u.new_zeros(g_all)
        grad_u = torch.zeros_like(u) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if w is not None and ctx.needs_input_grad[2] else None
        # a − b as one product [u, v]·[u, −v]ᵀ: inner dimension 2D, which BLAS runs ~20× faster than two D = 2 ones
        uv, u_neg_v = torch.cat([u, v], -1), torch.cat([u, -v], -1)
        # two buffers reused by every block: a fresh tensor per block costs its page faults (and zeroing) each time
        scratch_d, scratch_c = u.new_empty(groups, anchors, n, n), u.new_empty(groups, anchors, n, n)
        for g0 in range(0, g_all, groups):
            gs = slice(g0, g0 + groups)
            for i0 in range(0, n, anchors):
                ia = slice(i0, i0 + anchors)
                ui = u[gs, ia]                                                   # (g, a, N, D)
                shape = ui.shape[:2]
                diff = torch.matmul(uv[gs, ia], u_neg_v[gs, ia].transpose(-1, -2),
                                    out=scratch_d[:shape[0], :shape[1]])         # d = a − b, (g, a, N, N)
                # h(d) = c·(d − c/2) with c = h'(d) = clamp(d, −1, 1): no branch, no (g, a, N, N) mask
                c = torch.clamp(diff, -1, 1, out=scratch_c[:shape[0], :shape[1]])
                if w is None:
                    rows_c, col_d = c.view(c.shape[0], 1, -1), diff.view(c.shape[0], -1, 1)   # BLAS dot products
                    total[gs] += (torch.bmm(rows_c, col_d) - 0.5 * torch.bmm(rows_c, rows_c.transpose(1, 2))).view(-1)
                    if grad_u is not None:
                        grad_u[gs, ia] = 2 * (c @ ui)
                    continue
                h = diff.sub_(c, alpha=0.5).mul_(c)
                w_g = w[gs].unsqueeze(1)                                         # (g, 1, N)
                w_i = w[gs, ia]                                                  # (g, a)
                r = (h @ w_g.unsqueeze(3)).squeeze(3)                            # r_ij, (g, a, N)
                per_anchor = (r * w_g).sum(2)                                    # Σ_j ω_j r_ij
                total[gs] += (per_anchor * w_i).sum(1)
                if grad_w is not None:
                    grad_w[gs, ia] += per_anchor
                    grad_w[gs] += 2 * (r * w_i.unsqueeze(2)).sum(1)
                if grad_u is not None:
                    scale = (w_i.unsqueeze(2) * w_g).unsqueeze(3)                # ω_i ω_j, (g, a, N, 1)
                    grad_u[gs, ia] = 2 * (c @ (ui * w_g.unsqueeze(3))) * scale
        ctx.save_for_backward(grad_u, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_u, grad_w = ctx.saved_tensors
        return (None if grad_u is None else grad_u * grad_total.view(-1, 1, 1, 1), None,
                None if grad_w is None else grad_w * grad_total.view(-1, 1))
