"""The CRD term with the NCE's score gradients in closed form, for the synthetic engine.

The plain reference is common.kd.crd.CRDistill (autograd through CRD's eq. 18). Here the NCE's derivative w.r.t. the
scores is formed with its value (`_nce_rows`); once Z is fixed (after the first call) and ω is constant, `_NCELoss`
also forms both score factors' gradients in the forward pass, while the gathered bank entries are at hand. Values and
gradients equal the reference's up to float rounding (tests/golden, test_kd_losses).
"""
from __future__ import annotations

import torch

from common.kd.crd import CRDistill
from common.kd.layers import BatchedLinear


class FusedCRD(CRDistill):
    def _direction(self, layer: BatchedLinear, x, bank, cidx, z, w):
        """Per-run NCE loss (G,) of the anchors x (G, D, B) against a (G, f, n) bank."""
        if (z >= 0).all() and (w is None or not w.requires_grad):
            factors = self._factors(layer, x, bank, cidx)
            if isinstance(factors, tuple):  # the fused path (_NCELoss)
                return _NCELoss.apply(*factors, cidx.transpose(1, 2), w, *self._nce_args(z, cidx.shape[-1] - 1))
            dots = factors
        else:
            dots = self._scores(layer, x, bank, cidx)
        self._fix_normaliser(z, dots)
        rows = _NCERows.apply(dots, *self._nce_args(z, cidx.shape[-1] - 1))
        return (rows if w is None else rows * w).mean(1)


def _nce_rows(dots, log_z, inv_t: float, c: float, log_kpn: float, neg_weight: float):
    """Per-anchor NCE loss (G, B) from the scores dots (G, K+1, B) (row 0 the positive), and its gradient w.r.t.
    the scores (G, K+1, B), both in one pass.

    With log p = dots/T − log Z and c = K/n + ε the loss of anchor b is
        −log(p_0 / (p_0 + c)) − (K/draws) Σ_{k≥1} log((K/n) / (p_k + c))
    (CRD's eq. 18, each drawn negative standing for K/draws of them), and its derivative w.r.t. the scores is
        (p_0/(p_0 + c) − 1)/T for the positive and (K/draws)·p_k/(p_k + c)/T for each negative.
    The contrast axis K+1 sits in the middle (reductions over it are fast; a short last axis is not, on CPU).
    """
    log_p = dots * inv_t - log_z
    p = log_p.exp()
    p_c = p + c
    log_pc = p_c.log()
    rows = (log_pc[:, 0] - log_p[:, 0]
            + neg_weight * (log_pc[:, 1:].sum(1) - (dots.shape[1] - 1) * log_kpn))
    grad = p.div_(p_c)                                   # p/(p + c)
    pos = (grad[:, 0] - 1) * inv_t
    grad.mul_(neg_weight * inv_t)
    grad[:, 0] = pos
    return rows, grad


class _NCERows(torch.autograd.Function):
    """_nce_rows as an autograd function: the closed-form gradient instead of autograd's record and replay of a
    dozen elementwise ops."""

    @staticmethod
    def forward(ctx, dots, log_z, inv_t: float, c: float, log_kpn: float, neg_weight: float):
        rows, grad = _nce_rows(dots, log_z, inv_t, c, log_kpn, neg_weight)
        ctx.save_for_backward(grad)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        grad, = ctx.saved_tensors
        return grad * grad_rows.unsqueeze(1), None, None, None, None, None


class _NCELoss(torch.autograd.Function):
    """Per-run NCE loss (G,) = mean_b ω_b · NCE_b with the scores ⟨left[:, c_kb], right[:, b]⟩ of two factors
    left (G, r, n) and right (G, r, B) at the contrast indices cidx (G, K+1, B); constant ω (None: all 1).

    Both factors' gradients are formed during the forward pass, while the gathered (G, r, K+1, B) entries are at
    hand: ∂/∂right = Σ_k γ_kb left[:, c_kb] and ∂/∂left[:, c] = Σ_{(k,b): c_kb = c} γ_kb right[:, b], γ the NCE's
    score gradient times ω_b/B (_nce_rows). The backward pass only scales them by the per-run output gradient.
    """

    @staticmethod
    def forward(ctx, left, right, cidx, w, log_z, inv_t: float, c: float, log_kpn: float, neg_weight: float):
        g, r, n = left.shape
        k1, b = cidx.shape[1:]
        index = cidx.reshape(g, 1, k1 * b).expand(-1, r, -1)
        rows = left.gather(2, index).view(g, r, k1, b)
        nce, grad = _nce_rows((rows * right.unsqueeze(2)).sum(1), log_z, inv_t, c, log_kpn, neg_weight)
        weight = torch.full((g, 1, b), 1.0 / b, dtype=nce.dtype, device=nce.device) if w is None \
            else (w / b).unsqueeze(1)
        loss = (nce * weight.squeeze(1)).sum(1)
        grad.mul_(weight).unsqueeze_(1)                                                   # (G, 1, K+1, B)
        grad_right = (rows.mul_(grad)).sum(2) if ctx.needs_input_grad[1] else None
        grad_left = None
        if ctx.needs_input_grad[0]:
            grad_left = torch.zeros_like(left).scatter_add_(2, index, (grad * right.unsqueeze(2)).view(g, r, -1))
        ctx.save_for_backward(grad_left, grad_right)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_left, grad_right = ctx.saved_tensors
        scale = grad_loss.view(-1, 1, 1)
        return (None if grad_left is None else grad_left * scale, None if grad_right is None else grad_right * scale,
                None, None, None, None, None, None, None)
