"""The synthetic engine's KD terms: the common.kd references with closed-form gradients where the synthetic
experiments spend their time, and `build_loss`, which the engine's objectives are built with
(common.synthetic.dispatch).

Each fused term is a subclass of its reference that overrides only the step it speeds up, and falls back to the
reference wherever its closed form does not hold (a teacher or ω with a gradient). tests/golden holds both to the same
values.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from common import kd
from common.kd.logit import DKDistill
from common.synthetic.fused_crd import FusedCRD
from common.synthetic.fused_relational import FusedPKT, FusedRKD, FusedSP


class FusedDKD(DKDistill):
    """DKD whose two-class KL (the synthetic experiments are binary) has its gradients formed in the forward pass."""

    @staticmethod
    def _class_kl(z_t, z_s, temperature: float):
        return _ClassKL.apply(z_t, z_s, temperature)


class _ClassKL(torch.autograd.Function):
    """Per-row KL(softmax(z_t/T) ‖ softmax(z_s/T)) over the class axis 1 of (G, C, N) logits — D.kl_logits — with
    the gradients formed during the forward pass:
        ∂/∂z_s = (q − p)/T,   ∂/∂z_t = p ⊙ (log p − log q − KL)/T     (p, q the teacher's and student's softmax).
    The backward pass then only scales them; autograd would replay about ten elementwise ops instead."""

    @staticmethod
    def forward(ctx, z_t, z_s, temperature: float):
        log_p, log_q = F.log_softmax(z_t / temperature, 1), F.log_softmax(z_s / temperature, 1)
        p = log_p.exp()
        diff = log_p.sub_(log_q)                                                          # log p − log q
        kl = (p * diff).sum(1)
        grad_s = log_q.exp_().sub_(p).div_(temperature) if ctx.needs_input_grad[1] else None
        grad_t = diff.sub_(kl.unsqueeze(1)).mul_(p).div_(temperature) if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(grad_t, grad_s)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        grad_t, grad_s = ctx.saved_tensors
        g = grad_kl.unsqueeze(1)
        return None if grad_t is None else grad_t * g, None if grad_s is None else grad_s * g, None


FUSED = {"dkd": FusedDKD, "pkt": FusedPKT, "sp": FusedSP, "rkd": FusedRKD, "crd": FusedCRD}


def build_loss(name: str, **kwargs) -> kd.DistillLoss:
    """common.kd.build_loss, with the fused version of the terms that have one."""
    if name not in FUSED:
        return kd.build_loss(name, **kwargs)
    try:
        return FUSED[name](**kwargs)
    except TypeError as err:  # name the loss and the bad argument in one line, as common.kd.build_loss
        raise TypeError(f"KD loss {name!r}: {err}") from None
